"""dbkeeper's bot host: configuration, command line, PTB wiring, plugins and their lifecycle."""

__version__ = "0.1.0"

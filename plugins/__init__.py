"""Plugins that ship with dbkeeper: ``database`` (the heart of dbkeeper) and ``members`` (the
example feature that owns the example schema)."""

"""Plugins the bot host loads; the database plugin is the heart of dbkeeper."""

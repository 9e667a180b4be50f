"""dbkeeper's Alembic environment and the bot's schema revisions (0001, 0002, ...)."""

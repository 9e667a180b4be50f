"""Off the machine: continuous replication of SQLite (Litestream) and off-site copies."""

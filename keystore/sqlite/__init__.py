"""The SQLite keystore (the embedded default): file handling (db.py), its dialect
(dialect.py), numbered migrations, online backup."""

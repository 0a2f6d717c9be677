"""The SQLite backend of the keystore (the embedded default): file handling, numbered
migrations, the SQL of every operation, online backup."""

"""The keystore's one SQL implementation, over a dialect: ``SqlBackend`` (backend.py), by
resource (apps, devices, keys, tokens, connections, feed), the statements that need a
dialect's fragments (statements.py) and the dialect interface (dialect.py)."""

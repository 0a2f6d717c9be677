"""Durable broker state (docs/persistence.md): retained messages and persistent sessions
kept across restarts.

* ``model``: the rows a store holds and the batches written to it;
* ``store``: the ``StateStore`` interface and where the state lives;
* ``sqlite``: the embedded SQLite implementation (one file beside the keystore);
* ``recorder``: write-behind, recording changes as they happen and flushing them in one
  transaction per interval, off the message path;
* ``restore``: loading a saved state into a broker before its listeners open.
"""

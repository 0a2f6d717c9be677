"""The environment variables keybroker reads (each also a flag or a config setting).

A module of constants only: the CLI names them in its options before it loads anything
else (broker.cli), and settings read them (broker.core.settings)."""

ENV_DB = "KEYBROKER_DB"  # the keystore: an SQLite file or a postgresql:// URL
ENV_CONFIG = "KEYBROKER_CONFIG"  # the TOML config file
ENV_APP = "KEYBROKER_APP"  # the application a devices/keys command works in
ENV_EVENT_LOOP = "KEYBROKER_EVENT_LOOP"  # auto (uvloop when installed), uvloop or asyncio

"""The MQTT side of the daemon: the amqtt adapter (KeyBroker), one connection's protocol
handling, the per-session state, the auth plugin. See docs/architecture.md."""

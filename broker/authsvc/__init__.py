"""keybroker as the access-key service of a RabbitMQ or EMQX cluster (docs/cluster.md):
the engine delegates authentication and topic authorisation to it over HTTP.

* ``decisions``: the service's pure rules beside broker.policy (a connection's validity,
  RabbitMQ's topic form, resources, applications of virtual hosts);
* ``service``: the answers, engine-neutral, over the keystore (credentials, admission and
  the connection's snapshot, later requests), with the audit log and the guard;
* ``rabbitmq``, ``emqx``: the two HTTP contracts, translated into service calls;
* ``engines``: the engines' management APIs (kicks, stored subscriptions dropped);
* ``revoker``: the change feed turned into kicks;
* ``server``: the HTTP listener and the service's start and stop.
"""

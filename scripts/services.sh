# Sourced by scripts/test and .ci/run: the outside programs some tests need.
# PostgreSQL server binaries: on PATH, or where Debian's postgresql package puts them.
have_postgres() {
  command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}
# RabbitMQ: the tests run the nodes from Debian's /usr/lib/rabbitmq/bin (tests/support/rabbitmq.py).
have_rabbitmq() {
  [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && command -v epmd >/dev/null 2>&1
}

"""`python -m broker.cli` runs the `keybroker` command."""

from broker.cli import main

main()

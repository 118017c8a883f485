"""`python -m fleetctl` runs the CLI (the background server starts itself this way)."""

from fleetctl.cli import entry

entry()

"""Errors fleetctl raises to the people and pipelines that run it.

    FleetError            root of everything the CLI and orchestrator raise on purpose
    ├── SpecError         one or more problems in spec files (fleetctl.spec.diagnostics)
    ├── UsageError        a command line that cannot be acted on (bad --var, missing file)
    ├── SecretError       a secret's source is missing (fleetctl.plan.secrets)
    └── ServerError       the local server cannot start, be reached or stop
                          (fleetctl.server.daemon)

Each error builds its own one-paragraph message; the CLI maps classes to exit
codes in exactly one place (`fleetctl.cli.exits`). The SDK has its own
trees (`fleetctl.sandboxes`), as the sandbox SDK guide defines them.
"""


class FleetError(Exception):
    """Root of the errors fleetctl reports to its user."""


class UsageError(FleetError):
    """The command line cannot be acted on; the message says what to change."""

"""Every operation of the SDK, free of I/O: the control plane (`_control`), the data plane
(`_data`), live processes (`_process`) and checkpoints (`_checkpoints`), in one class
that the clients drive (`client.py`)."""

from __future__ import annotations

from fleetctl.sandboxes._checkpoints import CheckpointOps
from fleetctl.sandboxes._process import ProcessOps


class Operations(ProcessOps, CheckpointOps):
    """The SDK's behaviour; holds the gateway token cache and what each gateway speaks."""

"""Sandboxes on this machine with bubblewrap, overlayfs and cgroups.

runtime.py   BwrapRuntime: start, stop, adopt, usage (implements runtime.base.Runtime)
handle.py    how a running sandbox is found again, and the process primitives on it
idmap.py     a sandbox's own host id range, and idmapped mounts of shared layers
layout.py    a sandbox's directories and overlay layers, and the bwrap arguments
inside.py    commands and file transfers inside a sandbox (nsenter + setpriv)
netns.py     connections into a sandbox's network namespace (exposures)
cgroups.py   memory, cpu and pids limits; OOM counts
host.py      what this host offers (`fleetctl doctor`)
"""

from fleetctl.server.runtime.bwrap.runtime import BwrapRuntime

__all__ = ["BwrapRuntime"]

"""The spec language: render (Jinja2) → parse (YAML with positions) → validate → expand.

>>> fleets = load(["specs/eval.yaml"], {"shards": 3})
>>> [s.key for s in fleets[0].sandboxes]
"""

from fleetctl.spec.diagnostics import Diagnostic, Position, SpecError
from fleetctl.spec.expand import REPLICA_ENV, DesiredSandbox, Fleet
from fleetctl.spec.loader import load, load_text, spec_files
from fleetctl.spec.models import FleetSpec, SecretRef
from fleetctl.spec.render import load_var_file, parse_var

__all__ = [
    "REPLICA_ENV",
    "DesiredSandbox",
    "Diagnostic",
    "Fleet",
    "FleetSpec",
    "Position",
    "SecretRef",
    "SpecError",
    "load",
    "load_text",
    "load_var_file",
    "parse_var",
    "spec_files",
]

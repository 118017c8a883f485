"""Planning: what to change to make the live sandboxes match the spec.

model.py     plan data: Action, Change, InPlace, LiveSandbox, Plan
identity.py  how fleetctl recognises its own sandboxes, jobs and files
prepare.py   the desired side: secrets resolved, digests computed
secrets.py   resolving secret references (and handing values to redaction)
refresh.py   the live side: reading the fleets' sandboxes; make_plan
planner.py   the engine: desired vs live → Plan (pure: no I/O, no clock)
status.py    the live state of a fleet, for `status` and `wait`
saved.py     plans saved by `plan --out` and applied later
"""

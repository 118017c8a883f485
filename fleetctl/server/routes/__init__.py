"""HTTP routes, one router per plane, endpoints at module level.

control.py   /api/v1: sandboxes, logs, exposures, gateway auth (API key)
gateway.py   /gw/{user_ns}/{job_id}: exec and files (per-sandbox gateway token)
deps.py      what endpoints depend on: the service, and the two kinds of auth
"""

"""The local sandbox server: real isolated sandboxes behind the sandbox REST API.

    app.py       FastAPI routes: control plane (/api/v1) and data plane (/gw)
    service.py   sandbox lifecycle: provisioning, monitoring, timeouts, deletion
    store.py     SQLite state under the data dir
    runtime/     bubblewrap + overlayfs + cgroups: how a sandbox really runs
    proxy.py     exposed ports: host listeners that connect inside a sandbox's netns
    limits.py    rate limits (429 + Retry-After) and seeded fault injection
    daemon.py    `fleetctl server start|stop|status`, the data dir and the API token

The server knows nothing of specs or fleets: it speaks the sandbox API only.
"""

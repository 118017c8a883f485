"""The local server: real isolated sandboxes behind the sandbox REST API.

    routes/      one router per plane: control (/api/v1), gateway (/gw)
    app.py       the ASGI app: routers, middlewares, error statuses, lifespan
    api.py       wire payloads, as the official SDK sends and parses them
    service/     the behaviour: lifecycle, monitor, data plane, adoption
    runtime/     the seam to what really runs sandboxes (bubblewrap here)
    store.py     SQLite state under the data dir
    proxy.py     exposed ports: host listeners forwarded into a sandbox
    ratelimit.py rate limits (429 + Retry-After); faults.py seeded fault injection
    options.py   the server's settings; daemon.py the background process and token;
    serve.py     the server process itself (the only place a runtime is chosen)

The server knows nothing of specs or fleets: it speaks the sandbox API only.
"""

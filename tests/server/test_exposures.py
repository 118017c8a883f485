"""Exposed ports: reachable over HTTP and raw TCP through the host proxy, gone after delete."""

from __future__ import annotations

import socket
import time

import httpx

from tests.conftest import Running

HTTP_SERVER = "python3 -m http.server 8000 --bind 127.0.0.1 --directory /workspace"
ECHO_SERVER = (
    "python3 -c \"import socketserver as s; H = type('H', (s.StreamRequestHandler,), "
    "{'handle': lambda h: h.wfile.write(h.rfile.readline().upper())}); "
    "s.TCPServer(('127.0.0.1', 9000), H).serve_forever()\""
)


def get_until_served(url: str, timeout: float = 20) -> httpx.Response:
    """GET `url` until the server inside has started listening (deadline, no sleeps)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while True:
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{url} not served within {timeout}s"


def test_http_exposure_reaches_a_server_bound_to_loopback_with_network_off(
    api: httpx.Client, running: Running
) -> None:
    record, gw = running(network_access=False, start_command=HTTP_SERVER)
    gw.exec("echo exposed-content > /workspace/index.txt")
    exposure = api.post(
        f"/sandbox/{record['id']}/expose", json={"port": 8000, "name": "web"}
    ).json()
    assert exposure["url"].startswith("http://127.0.0.1:")
    assert (exposure["protocol"], exposure["name"], exposure["port"]) == ("HTTP", "web", 8000)
    assert get_until_served(exposure["url"] + "/index.txt").text == "exposed-content\n"
    listed = api.get(f"/sandbox/{record['id']}/expose").json()["exposures"]
    assert [e["exposure_id"] for e in listed] == [exposure["exposure_id"]]
    api.delete(f"/sandbox/{record['id']}")
    assert api.get("/sandbox/expose/all").json()["exposures"] == [] or all(
        e["sandbox_id"] != record["id"] for e in api.get("/sandbox/expose/all").json()["exposures"]
    )
    with httpx.Client(timeout=2) as client:
        try:
            client.get(exposure["url"] + "/index.txt")
            reachable = True
        except httpx.TransportError:
            reachable = False
    assert not reachable, "the exposure outlived its sandbox"


def test_tcp_exposure_gives_host_port_for_raw_sockets(api: httpx.Client, running: Running) -> None:
    record, _ = running(network_access=False, start_command=ECHO_SERVER)
    exposure = api.post(
        f"/sandbox/{record['id']}/expose", json={"port": 9000, "protocol": "TCP"}
    ).json()
    host, port = exposure["external_endpoint"].rsplit(":", 1)
    assert int(port) == exposure["external_port"]
    deadline = time.monotonic() + 20
    while True:
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(b"ping\n")
            reply = conn.recv(100)
        if reply:
            break
        assert time.monotonic() < deadline, "echo server never answered"
    assert reply == b"PING\n"


def test_unexpose_closes_the_port(api: httpx.Client, running: Running) -> None:
    record, _ = running(start_command=HTTP_SERVER)
    exposure = api.post(f"/sandbox/{record['id']}/expose", json={"port": 8000}).json()
    get_until_served(exposure["url"])
    gone = api.delete(f"/sandbox/{record['id']}/expose/{exposure['exposure_id']}")
    assert gone.status_code == 200
    assert api.get(f"/sandbox/{record['id']}/expose").json()["exposures"] == []
    with httpx.Client(timeout=2) as client:
        try:
            client.get(exposure["url"])
            reachable = True
        except httpx.TransportError:
            reachable = False
    assert not reachable


def test_port_rules_are_422(api: httpx.Client, running: Running) -> None:
    record, _ = running()
    for port in (21, 9001, 8080, 2222, 8081):
        response = api.post(f"/sandbox/{record['id']}/expose", json={"port": port})
        assert response.status_code == 422, port
    assert (
        api.post(
            f"/sandbox/{record['id']}/expose", json={"port": 80, "protocol": "UDP"}
        ).status_code
        == 422
    )

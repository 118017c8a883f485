"""Hosts of the tests' own, each in a network namespace the test makes and removes: an
"internet" host on TEST-NET-2 (198.51.100.2) serving HTTP on 80, 443 and 8080 (`/bytes/N`:
N bytes) and DNS,
and a "LAN" host (10.99.0.2) serving HTTP on 80, routed from this machine over veth
pairs. A sandbox's outbound traffic can reach them; no test sends anything elsewhere.

    with fake_hosts() as hosts:
        hosts.internet, hosts.lan        # their addresses
        hosts.names                      # what the DNS server answers (name -> address)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Runs inside a host's namespace: HTTP answering "NAME PORT" on each port, and DNS
#: (UDP 53) answering A records of the given names, NXDOMAIN for the rest.
SERVE = r"""
import json, socket, struct, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, ports, names = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
class Answer(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/bytes/"):  # /bytes/N: N zero bytes (benchmarks)
            size = int(self.path.split("/")[2])
            self.send_response(200); self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = bytes(1 << 20)
            while size > 0:
                self.wfile.write(chunk[:size]); size -= len(chunk)
            return
        body = f"{name} {self.server.server_address[1]}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
def dns(sock):
    while True:
        query, peer = sock.recvfrom(512)
        labels, at = [], 12
        while query[at]:
            labels.append(query[at + 1: at + 1 + query[at]].decode()); at += 1 + query[at]
        question = query[12: at + 5]
        address = names.get(".".join(labels).lower())
        flags = 0x8180 if address else 0x8183
        head = query[:2] + struct.pack(">HHHHH", flags, 1, 1 if address else 0, 0, 0)
        answer = (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(address)
                  if address else b"")
        sock.sendto(head + question + answer, peer)
for port in ports:  # bound before "ready": a client may connect at once
    threading.Thread(target=ThreadingHTTPServer(("0.0.0.0", port), Answer).serve_forever,
                     daemon=True).start()
if names:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 53))
    threading.Thread(target=dns, args=(sock,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


@dataclass
class Hosts:
    internet: str = "198.51.100.2"
    lan: str = "10.99.0.2"
    names: dict[str, str] = field(default_factory=dict)


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    subprocess.run([*prefix, *args], check=True, capture_output=True)


@contextlib.contextmanager
def fake_hosts() -> Iterator[Hosts]:
    hosts = Hosts(names={"internet.test": "198.51.100.2", "tricky.test": "10.99.0.2"})
    tag = f"{os.getpid() % 100000:05d}"
    made: list[str] = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for role, subnet, ports, names in (("i", "198.51.100", [80, 443, 8080], hosts.names),
                                           ("l", "10.99.0", [80], {})):  # fmt: skip
            netns, link = f"fctest-{role}{tag}", f"fct{role}{tag}"
            _ip("netns", "add", netns)
            made.append(netns)
            _ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("addr", "add", f"{subnet}.1/24", "dev", link)
            _ip("link", "set", link, "up")
            for args in (["addr", "add", f"{subnet}.2/24", "dev", "eth0"], ["link", "set", "lo",
                         "up"], ["link", "set", "eth0", "up"],
                         ["route", "add", "default", "via", f"{subnet}.1"]):  # fmt: skip
                _ip(*args, netns=netns)
            server = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-c", SERVE, role,
                 json.dumps(ports), json.dumps(names)], stdout=subprocess.PIPE,
            )  # fmt: skip
            servers.append(server)
            assert server.stdout is not None
            assert server.stdout.readline() == b"ready\n"
        yield hosts
    finally:
        for server in servers:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        for netns in made:
            subprocess.run(["ip", "netns", "delete", netns], check=False)


def netns_names() -> set[str]:
    """Named network namespaces on this machine."""
    path = Path("/run/netns")
    return set(os.listdir(path)) if path.is_dir() else set()

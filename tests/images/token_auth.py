"""Bearer token auth for the test registry: docker-registry's `auth: token` mode and a
token service of the test's own (the part a real deployment runs separately, e.g.
docker_auth), on loopback. Tokens are JWTs signed RS256 with a throwaway key (openssl),
their certificate in the `x5c` header and the registry's root bundle.

    with token_service(base, ("puller", "pw")) as service, \
            local_registry(base, token=service) as registry: ...
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx

SERVICE = "fleetctl-test-registry"
ISSUER = "fleetctl-test-issuer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    realm: str
    cert: Path
    key: Path
    user: tuple[str, str]
    issued: list[str] = field(default_factory=list)  # scopes, one per token

    def registry_auth(self) -> dict[str, object]:
        """The `auth:` section of the registry's config."""
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": str(self.cert)}}  # fmt: skip

    def token(self, scope: str) -> str:
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "der"],
                             check=True, capture_output=True).stdout  # fmt: skip
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        access = []
        for item in scope.split():
            kind, name, actions = item.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        claims = {
            "iss": ISSUER,
            "sub": self.user[0],
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                                   input=signing.encode(), check=True,
                                   capture_output=True).stdout  # fmt: skip
        self.issued.append(scope)
        return f"{signing}.{b64url(signature)}"


@contextlib.contextmanager
def token_service(base: Path, user: tuple[str, str]) -> Iterator[TokenService]:
    """A token service on 127.0.0.1 that gives tokens to `user` (Basic) and to no one else."""
    key, cert = base / "token.key", base / "token.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=fleetctl-test-token", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    expected = "Basic " + base64.b64encode(":".join(user).encode()).decode()
    holder: list[TokenService] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlparse(self.path).query)
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"token": holder[0].token(" ".join(query.get("scope", [])))})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    holder.append(TokenService(f"http://127.0.0.1:{server.server_port}/token", cert, key, user))
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()


class BearerFlow(httpx.Auth):
    """What a client does on a 401 with a Bearer challenge (the tests' pushes use it)."""

    requires_request_body = True  # an upload is sent again with its token

    def __init__(self, user: tuple[str, str]) -> None:
        self.user = user

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        challenge = response.headers.get("www-authenticate", "")
        if response.status_code != 401 or not challenge.startswith("Bearer "):
            return
        fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        scope = fields.get("scope", "")
        token = httpx.get(fields["realm"], params={"service": fields.get("service", ""),
                                                    "scope": scope},
                          auth=self.user).json()["token"]  # fmt: skip
        request.headers["Authorization"] = f"Bearer {token}"
        yield request

"""One redaction step for every output: a secret that reaches a message by any path is
shown by its source. Canary: an API that echoes the request it refused, secret included."""

from __future__ import annotations

import json
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fleetctl.cli import main
from fleetctl.redact import REDACTOR, Redactor

CANARY = "sk-CANARY-echoed-9d3e"


def test_redactor_replaces_values_in_text_and_nested_data() -> None:
    redactor = Redactor()
    redactor.add("hunter2-long", "<secret:from_env:A>")
    redactor.add("hunter2-long-and-longer", "<secret:from_env:B>")
    redactor.add("abc", "<secret:from_env:SHORT>")  # too short to redact without garbling
    assert redactor.text("x hunter2-long-and-longer y hunter2-long") == (
        "x <secret:from_env:B> y <secret:from_env:A>"
    )
    data = {"k": ["hunter2-long", ("abc", 3)], "hunter2-long": None}
    assert redactor.value(data) == {
        "k": ["<secret:from_env:A>", ("abc", 3)],
        "<secret:from_env:A>": None,
    }


class _Echo(BaseHTTPRequestHandler):
    """A sandbox API that lists nothing and refuses every create, quoting the request."""

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(200, {"sandboxes": [], "total": 0, "page": 1, "per_page": 100,
                           "has_next": False})  # fmt: skip

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self._answer(400, {"detail": f"cannot create {body}"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echoing_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        REDACTOR.clear()


@pytest.mark.parametrize(
    "argv",
    [
        ["apply", "--yes", "-o", "json"],
        ["apply", "--yes"],
        ["-vv", "--log-format", "json", "apply", "--yes", "-o", "json"],
    ],
    ids=["ndjson", "text", "json-logs"],
)
def test_a_secret_echoed_by_the_api_is_shown_by_its_source(
    echoing_api: str,
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FLEETCTL_API_URL", echoing_api)
    monkeypatch.setenv("FLEETCTL_API_KEY", "key")
    monkeypatch.setenv("CANARY_SOURCE", CANARY)
    spec = tmp_path / "fleet.yaml"
    spec.write_text(textwrap.dedent("""\
        apiVersion: fleetctl/v1
        kind: Fleet
        name: echo
        sandboxes:
          - name: holder
            image: python:3.11-slim
            secrets: {TOKEN: {from_env: CANARY_SOURCE}}
        """))  # fmt: skip
    code = main([*argv, str(spec)])
    out, err = capsys.readouterr()
    assert code == 3, out + err  # the create failed: a partial failure
    assert "cannot create" in out + err, "the API's message is shown"
    assert "<secret:from_env:CANARY_SOURCE>" in out + err, "the echo reached the output"
    assert CANARY not in out + err

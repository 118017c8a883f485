"""exec, upload, download and read-file against real sandboxes."""

from __future__ import annotations

import hashlib
import os
import time

import httpx

from tests.conftest import WHOLE, Running


def test_exec_working_dir_env_exit_code_and_stderr(running: Running) -> None:
    _, gw = running(environment_vars={"BASE": "b"})
    body = gw.exec(
        "pwd; echo $BASE $EXTRA; echo oops >&2; exit 7", working_dir="/tmp", env={"EXTRA": "e"}
    ).json()
    assert body == {"stdout": "/tmp\nb e\n", "stderr": "oops\n", "exit_code": 7, **WHOLE}
    assert gw.exec("pwd").json()["stdout"] == "/workspace\n"


def test_exec_timeout_is_408_and_kills_the_process_group(running: Running) -> None:
    _, gw = running()
    started = time.monotonic()
    response = gw.exec("sleep 300 & sleep 300; echo never", timeout=1)
    assert response.status_code == 408
    assert time.monotonic() - started < 30
    assert "timed out after 1s" in response.json()["detail"]
    left = gw.exec("ps -eo args | grep -c '^sleep 300' || true").json()["stdout"]
    assert left.strip() == "0"


def test_exec_timeout_above_900_seconds_is_refused(running: Running) -> None:
    _, gw = running()
    assert gw.exec("true", timeout=901).status_code == 422


def test_background_command_returns_at_once(running: Running) -> None:
    _, gw = running()
    started = time.monotonic()
    response = gw.exec("nohup sh -c 'sleep 60' </dev/null >/dev/null 2>&1 &")
    assert response.status_code == 200
    assert time.monotonic() - started < 10


def test_upload_creates_parents_and_download_round_trips(running: Running) -> None:
    _, gw = running()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    upload = gw.client.post(
        "upload", params={"path": "/workspace/a/b/c.bin"}, files={"file": ("c.bin", payload)}
    )
    assert upload.status_code == 200
    assert (upload.json()["size"], upload.json()["path"]) == (len(payload), "/workspace/a/b/c.bin")
    download = gw.client.get("download", params={"path": "/workspace/a/b/c.bin"})
    assert download.status_code == 200
    assert hashlib.sha256(download.content).digest() == hashlib.sha256(payload).digest()


def test_download_of_missing_file_is_404(running: Running) -> None:
    _, gw = running()
    response = gw.client.get("download", params={"path": "/workspace/none"})
    assert response.status_code == 404
    assert "/workspace/none" in response.json()["detail"]


def test_upload_over_200_mb_is_413(running: Running) -> None:
    _, gw = running()
    chunk = b"\0" * (1024 * 1024)

    def body() -> object:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n'
        for _ in range(201):
            yield chunk
        yield b"\r\n--b--\r\n"

    response = gw.client.post(
        "upload",
        params={"path": "/workspace/big"},
        content=body(),  # type: ignore[arg-type]
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 413
    assert gw.exec("test -e /workspace/big; echo $?").json()["stdout"] == "1\n"


def test_read_file_offset_length_and_negative_tail(running: Running) -> None:
    _, gw = running()
    gw.exec("printf 0123456789 > /workspace/f")
    whole = gw.client.get("read-file", params={"path": "/workspace/f"}).json()
    assert whole == {
        "content": "0123456789",
        "size": 10,
        "total_size": 10,
        "offset": 0,
        "truncated": False,
    }
    part = gw.client.get(
        "read-file", params={"path": "/workspace/f", "offset": 2, "length": 3}
    ).json()
    assert (part["content"], part["offset"], part["truncated"]) == ("234", 2, True)
    tail = gw.client.get(
        "read-file", params={"path": "/workspace/f", "offset": -4, "length": 100}
    ).json()
    assert (tail["content"], tail["offset"]) == ("6789", 6)
    missing = gw.client.get("read-file", params={"path": "/workspace/none"})
    assert missing.status_code == 404


def test_data_plane_refuses_a_sandbox_that_is_not_running(
    api: httpx.Client, running: Running
) -> None:
    record, gw = running()
    api.delete(f"/sandbox/{record['id']}")
    assert gw.exec("true").status_code in (401, 409)
    fresh = api.post(f"/sandbox/{record['id']}/auth").json()["token"]
    gw.client.headers["Authorization"] = f"Bearer {fresh}"
    for response in (
        gw.exec("true"),
        gw.client.get("download", params={"path": "/x"}),
        gw.client.post("upload", params={"path": "/x"}, files={"file": b"x"}),
    ):
        assert response.status_code == 409, response.text


def test_env_values_are_data_never_code(running: Running) -> None:
    """Values with quotes, $(...) and newlines arrive verbatim and are never evaluated."""
    _, gw = running(environment_vars={"BASE": "it's $(touch /tmp/base-ran)"})
    tricky = "a 'b' \"c\" $(touch /tmp/ran) `touch /tmp/ran2` \\ $HOME"
    for env in ({"X": tricky}, {"X": tricky + "\nsecond line"}):
        body = gw.exec('printf "%s|%s" "$X" "$BASE"; ls /tmp', env=env).json()
        assert body["stdout"] == f"{env['X']}|it's $(touch /tmp/base-ran)", body
    assert gw.exec("ls /tmp").json()["stdout"] == ""
    assert gw.exec("true", env={"BAD NAME": "x"}).status_code == 422


def test_upload_the_sandbox_cannot_write_is_a_400_even_when_large(running: Running) -> None:
    """The writer exits before the body is sent (a race that was a 500): still a 400."""
    _, gw = running()
    big = b"\0" * (8 * 1024 * 1024)  # past any pipe buffer, so the early exit is certain
    response = gw.client.post("upload", params={"path": "/etc/passwd"}, files={"file": big})
    assert response.status_code == 400
    assert "Permission denied" in response.json()["detail"]

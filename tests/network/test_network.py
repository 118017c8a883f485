"""Sandboxes with network access reach the outside and never the host, other sandboxes or
the LAN; egress lists narrow that; nothing is left behind.

The "internet" (198.51.100.2, with DNS) and the "LAN" (10.99.0.2) are network namespaces
these tests make (tests/network/fakenet.py); traffic goes nowhere else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fleetctl.sandboxes import APIClient, CreateSandboxRequest, SandboxClient
from fleetctl.server.runtime.bwrap.network import SPARES
from tests.conftest import (
    Server,
    own_server,
    sandbox_namespaces,
    sandbox_rules,
    start_server,
    stop_server,
    tidy_client,
)
from tests.network.fakenet import Hosts, fake_hosts, netns_names

#: Runs inside a sandbox: tries every "host:port" of argv at once, prints one line each.
PROBE = r"""
import json, socket, sys, threading
results = {}
def probe(target):
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.5) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b"".join(iter(lambda: conn.recv(4096), b""))
            results[target] = answer.decode(errors="replace").split("\r\n\r\n")[-1]
    except OSError as exc:
        results[target] = f"refused: {type(exc).__name__}"
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in threads]; [t.join() for t in threads]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with fake_hosts() as found:
        yield found


@pytest.fixture(scope="module")
def networked(hosts: Hosts) -> Iterator[Server]:
    with own_server("--sandbox-dns", hosts.internet) as (info, _):
        yield info


@pytest.fixture
def sdk(networked: Server) -> Iterator[SandboxClient]:
    """A client of the test server; the test's sandboxes are deleted after it."""
    with tidy_client(networked) as client:
        yield client


def started(sdk: SandboxClient, **fields: object) -> str:
    sandbox = sdk.create(
        CreateSandboxRequest(name="net", docker_image="python:3.11-slim", **fields)
    )
    sdk.wait_for_creation(sandbox.id)
    return sandbox.id


def probe(sdk: SandboxClient, sandbox_id: str, *targets: str) -> dict[str, str]:
    result = sdk.execute_command(sandbox_id, f"python3 -c '{PROBE}' {' '.join(targets)}")
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def reached(results: dict[str, str]) -> set[str]:
    return {target for target, answer in results.items() if not answer.startswith("refused")}


def address_of(sdk: SandboxClient, sandbox_id: str) -> str:
    shown = sdk.execute_command(sandbox_id, "python3 -c 'import socket; s=socket.socket("
                                "socket.AF_INET, socket.SOCK_DGRAM); s.connect((\"198.51.100.2\""
                                ", 9)); print(s.getsockname()[0])'")  # fmt: skip
    return shown.stdout.strip()


def test_outbound_reaches_the_internet_and_nothing_of_the_host_the_lan_or_other_sandboxes(
    sdk: SandboxClient, networked: Server, hosts: Hosts
) -> None:
    with socket.create_server(("0.0.0.0", 0)) as listener:  # a host service on every address
        port = listener.getsockname()[1]
        api_port = networked.url.rsplit(":", 1)[1]
        sandbox = started(sdk)
        other = started(sdk, start_command="python3 -m http.server 8000 --bind 0.0.0.0")
        other_address = address_of(sdk, other)
        own = address_of(sdk, sandbox)
        gateway = own.rsplit(".", 1)[0] + "." + str(int(own.rsplit(".", 1)[1]) - 1)
        targets = {
            "internet": f"{hosts.internet}:80",
            "by name": "internet.test:8080",
            "lan": f"{hosts.lan}:80",
            "metadata": "169.254.169.254:80",
            "host via gateway": f"{gateway}:{port}",
            "host's other address": f"198.51.100.1:{port}",
            "api on loopback": f"127.0.0.1:{api_port}",
            "other sandbox": f"{other_address}:8000",
        }
        results = probe(sdk, sandbox, *targets.values())
    assert reached(results) == {targets["internet"], targets["by name"]}, results
    assert results[targets["internet"]] == "i 80"
    assert results[targets["by name"]] == "i 8080"  # DNS through the given resolver
    six = sdk.execute_command(sandbox, "python3 -c 'import socket; socket.create_connection("
                                       "(\"2001:db8::1\", 80), timeout=1)'")  # fmt: skip
    assert six.exit_code != 0  # no IPv6 route out
    cmdline = sdk.execute_command(sandbox, "tr '\\0' ' ' < /proc/1/cmdline").stdout
    assert "/sandboxes/" not in cmdline  # bwrap's options (its dirs) went through a pipe
    assert "--overlay" not in cmdline
    with networked.client() as api:
        logs = api.get(f"/sandbox/{sandbox}/logs").json()["logs"]
    assert "[fleetctl] egress: " in logs  # denied connections are counted


def test_allow_and_deny_lists_hold_and_change_live(
    sdk: SandboxClient, networked: Server, hosts: Hosts
) -> None:
    everything = [f"{hosts.internet}:{p}" for p in (80, 443, 8080)] + [f"{hosts.lan}:80"]
    allowing = started(sdk, network_allowlist=[f"{hosts.internet}:443"])
    assert reached(probe(sdk, allowing, *everything)) == {everything[1]}
    denying = started(sdk, network_denylist=[f"{hosts.internet}/32:8080"])
    assert reached(probe(sdk, denying, *everything)) == set(everything[:2])
    with networked.client() as api:
        only_80 = {"allowlist": [f"{hosts.internet}:80"], "denylist": None}
        changed = api.put(f"/sandbox/{allowing}/egress-policy", json=only_80)
        assert changed.status_code == 200, changed.text
        assert changed.json()["applied"] is True
        assert api.get(f"/sandbox/{allowing}/egress-policy").json()["policy"] == only_80
        assert reached(probe(sdk, allowing, *everything)) == {everything[0]}
        opened = api.put(f"/sandbox/{allowing}/egress-policy",
                         json={"allowlist": None, "denylist": []})  # fmt: skip
        assert opened.json()["policy"] == {"allowlist": None, "denylist": []}
        assert reached(probe(sdk, allowing, *everything)) == set(everything[:3])


def test_hostname_entries_hold_against_dns_tricks(sdk: SandboxClient, hosts: Hosts) -> None:
    """Names resolve through the server's forwarder: an allowed name opens the addresses
    its real answer has, on its port; an allowed name answered with a LAN address opens
    nothing; other names do not resolve; a denied name neither resolves nor connects."""
    allowing = started(sdk, network_allowlist=["internet.test:443", "tricky.test"])
    results = probe(sdk, allowing, "internet.test:443", "internet.test:80", "tricky.test:80",
                    f"{hosts.lan}:80", "other.test:80")  # fmt: skip
    assert reached(results) == {"internet.test:443"}, results
    assert results["other.test:80"] == "refused: gaierror"  # no DNS for other names
    denying = started(sdk, network_denylist=["*.test:443"])
    assert probe(sdk, denying, "internet.test:443") == {"internet.test:443": "refused: gaierror"}
    results = probe(sdk, denying, f"{hosts.internet}:443", f"{hosts.internet}:80")
    assert reached(results) == {f"{hosts.internet}:80"}, results  # its address, learnt


def test_a_crashed_server_s_networked_sandboxes_survive_and_nothing_leaks(hosts: Hosts) -> None:
    others = spare_links()  # other servers' (the module's)
    with own_server("--sandbox-dns", hosts.internet) as (first, process):
        with SandboxClient(APIClient(api_key=first.token, base_url=first.url)) as sdk:
            image = "python:3.11-slim"
            ids = [sdk.create(CreateSandboxRequest(name=f"n{i}", docker_image=image)).id
                   for i in range(20)]  # fmt: skip
            sdk.bulk_wait_for_creation(ids)
        before = sandbox_namespaces()
        assert len(before) >= 20
        until(lambda: len(spare_links() - others) == SPARES, "the server's spares are made")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        until(lambda: spare_links() <= others, "a killed server's spares go with it")
        second, restarted = start_server(first.data_dir, "--sandbox-dns", hosts.internet)
        try:
            with SandboxClient(APIClient(api_key=second.token, base_url=second.url)) as sdk:
                target = f"{hosts.internet}:80"
                assert reached(probe(sdk, ids[7], target)) == {target}  # adopted: still on
                sdk.bulk_delete(sandbox_ids=ids)
        finally:
            stop_server(restarted)
    mine = {n for n in netns_names() if any(n.endswith(i) for i in ids)}
    assert mine == set()
    gone = {f"fcv{netns.split('-')[1]}" for netns in before - netns_names()}
    assert len(gone) >= 20  # every one of this server's: gone with its link and rules
    until(lambda: not gone & host_links() and spare_links() <= others, "links removed")
    chains = subprocess.run(["nft", "list", "map", "inet", "fleetctl_v1", "sandboxes"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert not {link for link in gone if link in chains}


def host_links() -> set[str]:
    """The host ends of sandbox links on this machine."""
    return {name for _, name in socket.if_nameindex() if name.startswith("fcv")}


def spare_links() -> set[str]:
    """Host links of namespaces that have no name yet: servers' spares."""
    return host_links() - {f"fcv{name.split('-')[1]}" for name in sandbox_namespaces()}


def until(check: Callable[[], bool], what: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not so after {seconds} s: {what}"
        time.sleep(0.05)


def test_sandboxes_deleted_while_they_start_leave_no_namespace_or_rule(
    sdk: SandboxClient,
) -> None:
    """Found by the suite's leak check: a delete racing a start removed the sandbox's run
    dir (and what names its namespace) between the namespace being made and bwrap."""
    rules_before = sandbox_rules()
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: created_and_deleted(sdk, i), range(24)))
    deadline = time.monotonic() + 30
    while (left := {n for n in netns_names() if n.endswith(tuple(ids))}) or (
        sandbox_rules() != rules_before
    ):
        assert time.monotonic() < deadline, f"left: {left}, rules {sandbox_rules()}"
        time.sleep(0.05)


def created_and_deleted(sdk: SandboxClient, index: int) -> str:
    found = sdk.create(CreateSandboxRequest(name=f"race{index}", docker_image="python:3.11-slim"))
    sdk.delete(found.id)
    return found.id


def test_insecure_host_network_shares_the_host_s_and_refuses_egress_lists() -> None:
    host_service = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=host_service.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{host_service.server_address[1]}"
    try:
        with (
            own_server("--insecure-host-network") as (info, _),
            SandboxClient(APIClient(api_key=info.token, base_url=info.url)) as sdk,
        ):
            assert reached(probe(sdk, started(sdk), target)) == {target}  # the host's loopback
            with info.client() as api:
                lists = {"name": "l", "docker_image": "python:3.11-slim",
                         "network_allowlist": ["198.51.100.2"]}  # fmt: skip
                refused = api.post("/sandbox", json=lists)
            assert refused.status_code == 400, refused.text
            assert "--insecure-host-network" in refused.json()["detail"]
    finally:
        host_service.shutdown()
        host_service.server_close()

"""A networked sandbox's own network namespace: outbound only, never towards the host.

Each sandbox with network access gets a named namespace (/run/netns), a veth pair (host
end `fcvNNNN`, sandbox end `eth0`) and a /30 of 10.200.0.0/16, with its default route
to the host end; the host forwards and masquerades its traffic. One nftables table
(`inet fleetctl_v1`, shared by every server on the host, made once) drops, for every
sandbox interface: anything to the host itself (INPUT), to another sandbox, over IPv6,
and to loopback, private, CGNAT, link-local (169.254.169.254 included), benchmark and
multicast ranges (FORWARD), except DNS to the resolvers the sandbox is given. Each
sandbox's own chain (reached by a verdict map on its interface) holds that and its
egress policy, and counts what it denies. The host still connects into a sandbox
(exposures enter its namespace), and no process runs per sandbox.

Each server keeps a few namespaces made ahead (spares: link, addresses and route in
place, no name, held by a descriptor, so they go with the server however it exits); a
start takes one, names it after the sandbox and adds its rules. What a sandbox holds on
the host is named in its meta dir first (`netns`), so a start cut short or a crashed
server's sandbox is reclaimed by id. Taking a slot (servers share them, found from
/run/netns and the host's links) and making the table run under one host-wide lock; the
rest of a setup, and a removal, run beside others (each sandbox's rules are its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

from fleetctl.egress import parse_entry
from fleetctl.server.runtime.base import EgressPolicy, LaunchSpec, RuntimeFailure
from fleetctl.server.runtime.bwrap.dns import Forwarder, NamePolicy
from fleetctl.server.runtime.bwrap.host import SYSTEM_PATH
from fleetctl.server.runtime.bwrap.netns import (
    Spare,
    Spares,
    made_netns,
    name_netns,
    unname_netns,
)
from fleetctl.server.runtime.bwrap.nft import Nft, NftError

NETNS_DIR = Path("/run/netns")
LOCK = Path("/run/fleetctl-network.lock")
TABLE = "fleetctl_v1"
PREFIX = "fcv"  # host ends: fcv + 4 hex digits (interface names stop at 15 characters)
SUBNET = ipaddress.ip_network("10.200.0.0/16")
SLOTS = SUBNET.num_addresses // 4
SPARES = 4  # namespaces kept made ahead, per server
#: Never reachable from a sandbox, whatever its egress policy says (224/3: multicast and
#: the reserved 240/4).
BLOCKED = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
           "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
           "224.0.0.0/3")  # fmt: skip
TABLE_RULES = f"""
table inet {TABLE} {{
  set blocked {{ type ipv4_addr; flags interval; elements = {{ {", ".join(BLOCKED)} }} }}
  map sandboxes {{ type ifname : verdict; }}
  set forwarders {{ type ifname . ipv4_addr; }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{PREFIX}*" ct state established,related accept
    iifname . ip daddr @forwarders udp dport 53 accept
    iifname "{PREFIX}*" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{PREFIX}*" oifname "{PREFIX}*" drop
    iifname "{PREFIX}*" meta nfproto ipv6 drop
    iifname "{PREFIX}*" iifname vmap @sandboxes
    iifname "{PREFIX}*" drop
    oifname "{PREFIX}*" ct state established,related accept
    oifname "{PREFIX}*" drop
  }}
}}
table ip {TABLE}_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {SUBNET} oifname != "{PREFIX}*" masquerade
  }}
}}
"""


@dataclass(frozen=True, slots=True)
class SandboxNet:
    """One sandbox's namespace, link and addresses."""

    netns: str
    slot: int

    @property
    def link(self) -> str:
        return f"{PREFIX}{self.slot:04x}"

    @property
    def chain(self) -> str:
        return f"s_{self.link}"

    @property
    def sets(self) -> dict[int, str]:
        """Its sets of addresses learnt from DNS answers, per port (hostname entries)."""
        return {port: f"n{port}_{self.link}" for port in (80, 443)}

    def address(self, end: int) -> str:
        """The host end (1) or the sandbox end (2) of its /30."""
        return str(SUBNET.network_address + self.slot * 4 + end)


class Networks:
    """Namespaces for networked sandboxes. `problem` says why this host cannot make them
    (then sandboxes with network are refused, unless the server shares its own)."""

    def __init__(self, resolvers: Sequence[str]) -> None:
        self.resolvers = tuple(resolvers)
        self.ip, self.nsenter = (shutil.which(tool, path=SYSTEM_PATH) or ""
                                 for tool in ("ip", "nsenter"))  # fmt: skip
        self.nft: Nft | None = None
        with contextlib.suppress(OSError):
            self.nft = Nft()
        self.problem = self._prepare()
        self._forwarder: Forwarder | None = None
        self._setups = futures.ThreadPoolExecutor(8, thread_name_prefix="netns")
        self._spares = Spares(self._spare, SPARES) if self.problem is None else None

    def setup(self, meta: Path, spec: LaunchSpec) -> futures.Future[SandboxNet]:
        """`create` on a thread of its own: a third of a networked start, made meanwhile."""
        return self._setups.submit(self.create, meta, spec.seq, spec.egress)

    def _prepare(self) -> str | None:
        if os.geteuid() != 0:
            return "the server does not run as root"
        if not self.ip or not self.nft or not self.nsenter:
            return "iproute2 (`ip`), nftables (libnftables) or util-linux (`nsenter`) is missing"
        try:
            with self._locked():
                if f"table inet {TABLE}\n" not in self._nft("list tables", check=False) + "\n":
                    self._nft(TABLE_RULES)
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        except (OSError, RuntimeFailure) as exc:
            return f"cannot set up nftables and forwarding: {exc}"
        return None

    def create(self, meta: Path, seq: int, egress: EgressPolicy | None) -> SandboxNet:
        """A namespace for the sandbox whose meta dir is `meta`: a spare (made ahead, or now
        if none is ready), named after the sandbox (recorded there first), and its rules."""
        assert self._spares is not None
        spare = self._spares.take(seq)
        net = SandboxNet(f"fleetctl-{spare.slot:04x}-{meta.name}", spare.slot)
        try:
            _record(meta, net, egress)
            name_netns(spare.fd, NETNS_DIR / net.netns)
        except OSError as exc:
            raise RuntimeFailure(str(exc)) from None
        finally:
            os.close(spare.fd)
        self._apply(net, egress, had=None)
        return net

    def close(self) -> None:
        """Drop the spare namespaces (the server is going away)."""
        if self._spares is not None:
            self._spares.close()
        self._setups.shutdown(wait=True)

    def _spare(self, seq: int) -> Spare:
        """A namespace with its link to the host, addresses and default route, named nowhere
        yet. Taking a slot (no namespace or host link has it; its link is made in the same
        `ip` run) holds the host-wide lock; the host end's addresses are set beside others."""
        with self._locked():
            used = _used_slots()
            slot = next((s % SLOTS for s in range(seq, seq + SLOTS) if s % SLOTS not in used),
                        None)  # fmt: skip
            if slot is None:
                raise RuntimeFailure(f"all {SLOTS} sandbox network slots of this host are used")
            net = SandboxNet("", slot)
            fd = made_netns(lambda: self._run([self.ip, "-batch", "-"], "\n".join([
                f"link add eth0 type veth peer name {net.link} netns {os.getpid()}",
                f"addr add {net.address(2)}/30 dev eth0",
                "link set lo up", "link set eth0 up",
                f"route add default via {net.address(1)}",
            ])))  # fmt: skip
        try:
            host_end = f"addr add {net.address(1)}/30 dev {net.link}\nlink set {net.link} up"
            self._run([self.ip, "-batch", "-"], host_end)
        except RuntimeFailure:
            os.close(fd)
            raise
        return Spare(slot, fd)

    def set_egress(self, meta: Path, egress: EgressPolicy | None) -> SandboxNet:
        """Replace a running sandbox's egress policy (its rules atomically)."""
        net = _recorded(meta)
        if net is None:
            raise RuntimeFailure("the sandbox has no network namespace of its own")
        had = forwarded(_recorded_egress(meta))
        _record(meta, net, egress)
        self._apply(net, egress, had=had)
        return net

    def adopt(self, meta: Path) -> None:
        """After a server restart: answer DNS again for a sandbox that had this server's."""
        net, egress = _recorded(meta), _recorded_egress(meta)
        if net is not None and forwarded(egress):
            self._forward(net, egress)

    def denied(self, meta: Path) -> int:
        """Connections the sandbox's policy and the blocked ranges refused so far."""
        net = _recorded(meta)
        if net is None:
            return 0
        listed = self._nft(f"list chain inet {TABLE} {net.chain}", json=True, check=False)
        with contextlib.suppress(ValueError):
            return sum(
                int(expr["counter"]["packets"])
                for item in json.loads(listed).get("nftables", [])
                for expr in (item.get("rule") or {}).get("expr", [])
                if isinstance(expr, dict) and "counter" in expr
            )
        return 0

    def remove(self, meta: Path) -> None:
        """Remove what `create` made for that meta dir (nothing made: nothing to do)."""
        net = _recorded(meta)
        # the namespace is made first and removed last: without it, the slot (and the rules
        # named after it) may be another sandbox's by now. With it, the slot stays this
        # sandbox's (no lock needed: the runtime never removes one sandbox's twice at once).
        if net is not None and (NETNS_DIR / net.netns).exists():
            lines = [f"delete element inet {TABLE} sandboxes {{ {net.link} }}",
                     f"delete chain inet {TABLE} {net.chain}"]  # fmt: skip
            optional = [
                f"delete element inet {TABLE} forwarders {{ {net.link} . {net.address(1)} }}",
                *(f"delete set inet {TABLE} {name}" for name in net.sets.values()),
            ]
            if forwarded(_recorded_egress(meta)):
                lines += optional
            try:  # what it should have, in one go
                self._nft("\n".join(lines) + "\n")
            except RuntimeFailure:  # one at a time: some are missing (a start cut short)
                for line in [*lines, *optional]:
                    self._nft(line, check=False)
            unname_netns(NETNS_DIR / net.netns)  # then the kernel removes it, its link too
        if net is not None and self._forwarder is not None:
            self._forwarder.remove(net.link)
        (meta / "netns").unlink(missing_ok=True)

    def wrap(
        self, net: SandboxNet, home: Path, egress: EgressPolicy | None
    ) -> tuple[list[str], list[str]]:
        """The prefix that runs bwrap in the sandbox's namespace, and the bwrap options that
        give it its resolvers (a resolv.conf written in its `home`)."""
        resolv = self.write_resolv(home / "resolv.conf", net, egress)
        enter = [self.nsenter, f"--net={NETNS_DIR / net.netns}", "--"]
        return enter, ["--ro-bind", str(resolv), "/etc/resolv.conf"]

    def write_resolv(self, path: Path, net: SandboxNet, egress: EgressPolicy | None) -> Path:
        """Write the sandbox's /etc/resolv.conf at `path` (bound inside: rewritten in place,
        the same inode): this server's forwarder, or the upstreams."""
        found = [net.address(1)] if forwarded(egress) else self.resolvers
        path.write_text("".join(f"nameserver {address}\n" for address in found))
        path.chmod(0o444)
        return path

    def _apply(self, net: SandboxNet, egress: EgressPolicy | None, *, had: bool | None) -> None:
        """Make (`had` None) or replace the sandbox's rules; `had`: its DNS went through
        the forwarder so far."""
        script = self._chain(net, egress, had=had)
        try:
            self._nft(script)
        except RuntimeFailure:  # the table went (e.g. `nft flush ruleset`): made again
            with self._locked():
                if f"table inet {TABLE}\n" in self._nft("list tables") + "\n":
                    raise
                self._nft(TABLE_RULES)
            self._nft(script)
        if forwarded(egress):
            self._forward(net, egress)
        elif self._forwarder is not None:
            self._forwarder.remove(net.link)

    def _forward(self, net: SandboxNet, egress: EgressPolicy | None) -> None:
        assert egress is not None
        if self._forwarder is None:
            self._forwarder = Forwarder(self.resolvers, self._learn)
        policy = NamePolicy.of(egress.mode == "allow", egress.entries, net.sets)
        try:
            self._forwarder.add(net.link, net.address(1), policy)
        except OSError as exc:
            raise RuntimeFailure(f"cannot answer DNS for the sandbox: {exc}") from None

    def _learn(self, name: str, addresses: list[str], seconds: int) -> None:
        elements = ", ".join(f"{address} timeout {seconds}s" for address in addresses)
        self._nft(f"add element inet {TABLE} {name} {{ {elements} }}\n", check=False)

    def _chain(self, net: SandboxNet, egress: EgressPolicy | None, *, had: bool | None) -> str:
        """The sandbox's chain (made or flushed), its rules, its verdict map entry, and its
        sets of learnt addresses when its DNS goes through the forwarder. Elements and sets
        are deleted only when they exist: a deletion costs a commit ~3x as long."""
        allow = egress is not None and egress.mode == "allow"
        rules = ["ct state established,related accept"]  # a policy change spares them
        if self.resolvers and not forwarded(egress):
            rules.append(f"ip daddr {{ {', '.join(self.resolvers)} }} "
                         "meta l4proto { tcp, udp } th dport 53 accept")  # fmt: skip
        rules += ["ip daddr @blocked ct state new counter drop", "ip daddr @blocked drop"]
        verdict = "accept" if allow else "counter drop"
        for entry in egress.entries if egress else ():
            parsed = parse_entry(entry)
            if parsed.is_network:
                ports = f" th dport {parsed.ports[0]}-{parsed.ports[1]}" if parsed.ports else ""
                rules.append(f"ip daddr {parsed.target}{ports} {verdict}")
        lines = [f"add chain inet {TABLE} {net.chain}", f"flush chain inet {TABLE} {net.chain}"]
        forwarder = f"element inet {TABLE} forwarders {{ {net.link} . {net.address(1)} }}"
        if forwarded(egress):
            lines.append(f"add {forwarder}")
            for port, name in net.sets.items():
                lines += [f"add set inet {TABLE} {name} {{ type ipv4_addr; flags timeout; }}",
                          f"flush set inet {TABLE} {name}"]  # fmt: skip
                rules.append(f"ip daddr @{name} tcp dport {port} {verdict}")
        elif had:  # after the flush: no rule refers to its sets any more
            lines += [
                f"delete {forwarder}",
                *(f"delete set inet {TABLE} {n}" for n in net.sets.values()),
            ]
        if allow:
            rules += ["ct state new counter drop", "drop"]
        rules.append("accept")
        lines += [f"add rule inet {TABLE} {net.chain} {rule}" for rule in rules]
        if had is None:
            lines.append(f"add element inet {TABLE} sandboxes {{ {net.link} : jump {net.chain} }}")
        return "\n".join(lines) + "\n"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _nft(self, script: str, *, json: bool = False, check: bool = True) -> str:
        """What the script printed; when refused, RuntimeFailure (or "" without `check`)."""
        assert self.nft is not None
        try:
            return self.nft.run(script, json=json)
        except NftError as exc:
            if check:
                raise RuntimeFailure(f"nft failed: {exc}") from None
            return ""

    @staticmethod
    def _run(argv: Sequence[str], stdin: str) -> None:
        """Run an `ip` batch; when it fails, RuntimeFailure with what it said."""
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              env={"PATH": SYSTEM_PATH}, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeFailure(f"{os.path.basename(argv[0])} failed: "
                                 f"{done.stderr.strip()[:400]}")  # fmt: skip


def forwarded(egress: EgressPolicy | None) -> bool:
    """True when the sandbox's DNS goes through this server's forwarder: an allowlist (its
    names, and no other name, resolve), or a denylist that names hosts."""
    if egress is None:
        return False
    return egress.mode == "allow" or any(not parse_entry(e).is_network for e in egress.entries)


def host_resolvers(
    confs: Sequence[Path] = (Path("/etc/resolv.conf"), Path("/run/systemd/resolve/resolv.conf")),
) -> tuple[str, ...]:
    """This machine's IPv4 resolvers, but for loopback ones (a sandbox cannot reach them):
    from resolv.conf, else from systemd-resolved's upstream list (Ubuntu's resolv.conf
    names only its 127.0.0.53 stub)."""
    for conf in confs:
        found = []
        with contextlib.suppress(OSError):
            for line in conf.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        address = ipaddress.ip_address(parts[1])
                        if address.version == 4 and not address.is_loopback:
                            found.append(str(address))
        if found:
            return tuple(found)
    return ()


def _record(meta: Path, net: SandboxNet, egress: EgressPolicy | None) -> None:
    policy = {"mode": egress.mode, "entries": list(egress.entries)} if egress else None
    (meta / "netns").write_text(json.dumps({"netns": net.netns, "slot": net.slot,
                                            "egress": policy}))  # fmt: skip


def _recorded_egress(meta: Path) -> EgressPolicy | None:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        policy = json.loads((meta / "netns").read_text())["egress"]
        if policy:
            return EgressPolicy(policy["mode"], tuple(policy["entries"]))
    return None


def _recorded(meta: Path) -> SandboxNet | None:
    try:
        data = json.loads((meta / "netns").read_text())
        return SandboxNet(str(data["netns"]), int(data["slot"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _used_slots() -> set[int]:
    """Slots of every sandbox namespace on the host (all servers'), named fleetctl-SLOT-ID,
    and of every host link fcvSLOT (spares have no name yet)."""
    used = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(NETNS_DIR):
            parts = name.split("-")
            if len(parts) == 3 and parts[0] == "fleetctl":
                with contextlib.suppress(ValueError):
                    used.add(int(parts[1], 16))
    for _, link in socket.if_nameindex():
        if link.startswith(PREFIX):
            with contextlib.suppress(ValueError):
                used.add(int(link[len(PREFIX) :], 16))
    return used

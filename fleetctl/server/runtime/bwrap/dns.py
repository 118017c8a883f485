"""DNS for sandboxes whose egress policy names hosts: how hostname entries are enforced.

Such a sandbox's only resolver is the host end of its veth, where this forwarder listens
(one UDP socket per sandbox, one thread for all, a small pool for the lookups). It asks
the server's upstream resolvers, never trusting the sandbox with a lookup:

    allowlist  a name an entry covers is answered, and the IPv4 addresses of the answer
               are added, for the answer's TTL, to the sandbox's nftables sets of the
               entry's ports (80, 443); any other name is answered NXDOMAIN (no DNS
               channel out either)
    denylist   a name an entry covers is answered NXDOMAIN, and the addresses it has
               upstream are added to the sets its ports are refused on; others answered

Only a plain query (one IN question) goes upstream, as a new query of the server's; TTLs
are clamped to what the sets keep; a sandbox has at most 16 queries in flight. Addresses
are learnt only from the upstream answers this forwarder got, and the blocked
ranges come before them in the sandbox's chain: an answer pointing an allowed name at a
private address (the LAN, the host) opens nothing. A denylisted host stays reachable by
an address the sandbox learnt elsewhere (denylists are best effort by nature).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype

from fleetctl.egress import parse_entry

#: How long a learnt address stays in a set, bounded whatever the TTL says (seconds).
MIN_TTL, MAX_TTL = 30, 3600
UPSTREAM_TIMEOUT_S = 2.0
#: Queries of one sandbox being answered at once; more are dropped (clients retry).
MAX_IN_FLIGHT = 16
log = logging.getLogger("fleetctl.server")
#: Adds (set name, addresses, seconds) to nftables.
Learn = Callable[[str, list[str], int], None]


@dataclass(frozen=True, slots=True, eq=False)
class NamePolicy:
    """A sandbox's hostname entries: `names` (`*.` wildcards kept) with their ports (80
    and/or 443), `allow` or deny, and the sets learnt addresses go to, per port."""

    allow: bool
    names: tuple[tuple[str, tuple[int, ...]], ...]
    sets: dict[int, str]

    @classmethod
    def of(cls, allow: bool, entries: Sequence[str], sets: dict[int, str]) -> NamePolicy:
        names = []
        for entry in entries:
            parsed = parse_entry(entry)
            if not parsed.is_network:
                ports = (80, 443) if parsed.ports is None else (parsed.ports[0],)
                names.append((parsed.target, ports))
        return cls(allow, tuple(names), sets)

    def ports_of(self, name: dns.name.Name) -> tuple[int, ...]:
        """The ports an entry gives `name` (empty: no entry covers it)."""
        found: set[int] = set()
        for pattern, ports in self.names:
            base = dns.name.from_text(pattern.removeprefix("*."))
            wildcard = pattern.startswith("*.")
            if name == base or (wildcard and name.is_subdomain(base)):
                found.update(ports)
        return tuple(sorted(found))


class Forwarder:
    """The DNS forwarder of every sandbox with hostname entries on this server."""

    def __init__(self, upstream: Sequence[str], learn: Learn) -> None:
        self.upstream = tuple(upstream)
        self.learn = learn
        self._selector = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="dns")
        self._lock = threading.Lock()
        self._sandboxes: dict[str, tuple[socket.socket, NamePolicy]] = {}
        self._in_flight: dict[str, int] = {}
        threading.Thread(target=self._serve, name="dns-forwarder", daemon=True).start()

    def add(self, link: str, address: str, policy: NamePolicy) -> None:
        """Answer on `address`:53 of `link` (only what comes in on it) for the sandbox
        behind it, with `policy` (replacing the one it had)."""
        with self._lock:
            known = self._sandboxes.get(link)
            if known is not None:
                self._sandboxes[link] = (known[0], policy)
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.encode())
                sock.bind((address, 53))
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            self._sandboxes[link] = (sock, policy)
            self._selector.register(sock, selectors.EVENT_READ, link)

    def remove(self, link: str) -> None:
        with self._lock:
            known = self._sandboxes.pop(link, None)
            if known is not None:
                self._selector.unregister(known[0])
                known[0].close()

    def _serve(self) -> None:
        while True:
            try:
                for key, _ in self._selector.select(timeout=1.0):
                    self._receive(str(key.data))
            except Exception:  # one bad moment must not end DNS for every sandbox
                log.exception("DNS forwarder")

    def _receive(self, link: str) -> None:
        with self._lock:
            known = self._sandboxes.get(link)
            if known is None:
                return
            with contextlib.suppress(OSError):
                query, peer = known[0].recvfrom(4096)
                if self._in_flight.get(link, 0) < MAX_IN_FLIGHT:  # past it: dropped
                    self._in_flight[link] = self._in_flight.get(link, 0) + 1
                    self._pool.submit(self._answer, link, known, query, peer)

    def _answer(
        self, link: str, known: tuple[socket.socket, NamePolicy], data: bytes, peer: Any
    ) -> None:
        try:
            reply = self._reply(link, known[1], data)
            if reply is not None:
                with contextlib.suppress(OSError):
                    known[0].sendto(reply, peer)
        except Exception:
            log.exception("DNS forwarder: a query from %s", link)
        finally:
            with self._lock:
                self._in_flight[link] -= 1

    def _reply(self, link: str, policy: NamePolicy, data: bytes) -> bytes | None:
        """The answer to a sandbox's query (None: none), learning what it opens. Only a
        plain query of one IN question is asked upstream, as a new query of our own."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if (query.opcode() != dns.opcode.QUERY or query.flags & dns.flags.QR
                or len(query.question) != 1
                or query.question[0].rdclass != dns.rdataclass.IN):  # fmt: skip
            return None
        question = query.question[0]
        ports = policy.ports_of(question.name)
        reply = dns.message.make_response(query)
        if policy.allow and not ports:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply.to_wire()
        answer = self._upstream(dns.message.make_query(question.name, question.rdtype))
        with self._lock:  # a late answer learns nothing for a policy no longer in force
            current = self._sandboxes.get(link)
            if current is None or current[1] is not policy:
                return None
        if answer is None:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply.to_wire()
        ttl = max(MIN_TTL, min(MAX_TTL, min((r.ttl for r in answer.answer), default=MIN_TTL)))
        if ports:
            addresses = [item.address for rrset in answer.answer for item in rrset
                         if rrset.rdtype == dns.rdatatype.A]  # fmt: skip
            for port in ports:
                if addresses:
                    self.learn(policy.sets[port], addresses, ttl)
        if not policy.allow and ports:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            return reply.to_wire()
        for rrset in answer.answer:  # never cached past what the sets keep
            rrset.ttl = min(rrset.ttl, ttl)
        reply.answer = answer.answer
        reply.set_rcode(answer.rcode())
        return reply.to_wire()

    def _upstream(self, query: dns.message.Message) -> dns.message.Message | None:
        for resolver in self.upstream:
            with contextlib.suppress(dns.exception.DNSException, OSError):
                return dns.query.udp(query, resolver, timeout=UPSTREAM_TIMEOUT_S)
        return None

"""The egress allow/deny list entry contract, as today's sandbox API defines it.

An entry is one of:

    example.com, *.example.com       a hostname, with an optional leftmost `*.` wildcard
    203.0.113.7, 10.0.0.0/8          an IPv4 address, or an IPv4 CIDR (host bits allowed)
    ENTRY:443, ENTRY:8000-8100       any of the above with a port or a low-high port range;
                                     a hostname only with port 80 or 443

No IPv6, no schemes, credentials, paths or query strings, no bare `*`. A list holds at
most `MAX_ENTRIES`; allow and deny lists are mutually exclusive. The server, the SDK and
the spec language validate with this one module.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ENTRIES = 1024
DOMAIN_PORTS = frozenset({80, 443})
_PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?")


class EgressError(ValueError):
    """An entry or list that breaks the contract; the message names it."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A valid entry, taken apart: an IPv4 address or CIDR (`network`) or a hostname
    (`host`, possibly `*.`-wildcarded), and its ports (None: all)."""

    target: str
    ports: tuple[int, int] | None
    is_network: bool


def parse_entry(entry: str) -> Entry:
    """The parts of `entry`; EgressError when it is not valid."""
    check_entry(entry)
    value = entry.strip()
    ports = None
    if ":" in value and not _is_network(value):
        value, _, text = value.rpartition(":")
        low, _, high = text.partition("-")
        ports = (int(low), int(high or low))
    if _is_network(value):
        return Entry(str(ipaddress.ip_network(value, strict=False)), ports, True)
    return Entry(value.rstrip(".").lower(), ports, False)


def check_entry(entry: str) -> None:
    """Raise EgressError when `entry` is not a valid allow/deny entry."""
    value = entry.strip()
    if not value:
        raise EgressError("empty entry")
    _check(entry, value)


def _check(entry: str, value: str) -> bool:
    """Validate `value` (part of `entry`); True when it is an IP address or CIDR."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        if address.version == 6:
            raise EgressError(f"'{entry}': IPv6 is not supported")
        return True
    if ":" in value and "://" not in value and not _is_network(value):
        host, _, ports = value.rpartition(":")
        match = _PORTS.fullmatch(ports)
        low = int(match.group(1)) if match else 0
        high = int(match.group(2) or low) if match else 0
        if not match or not 1 <= low <= high <= 65535:
            raise EgressError(
                f"'{entry}': port must be a number from 1 to 65535 or a low-high range"
            )
        is_ip = _check(host, host)  # as today's API words it: an error names the host
        if not is_ip and (low != high or low not in DOMAIN_PORTS):
            raise EgressError(f"'{entry}': domain entries support only ports 80 and 443; use an "
                              "IP or CIDR entry for other ports")  # fmt: skip
        return is_ip
    if "/" in value:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise EgressError(f"'{entry}' is not a valid IPv4 CIDR") from None
        if network.version == 6:
            raise EgressError(f"'{entry}': IPv6 is not supported")
        return True
    if "@" in value:
        raise EgressError(f"'{entry}': credentials are not supported")
    if "?" in value:
        raise EgressError(f"'{entry}': query strings are not supported")
    domain = value.removeprefix("*.").rstrip(".")
    if not domain:
        raise EgressError(f"'{entry}': domain is empty")
    if "*" in domain:
        raise EgressError(f"'{entry}': wildcard is only supported as the leftmost label")
    if "" in domain.split("."):
        raise EgressError(f"'{entry}' contains an empty label")
    return False


def _is_network(value: str) -> bool:
    """An IP network as a whole (e.g. an IPv6 CIDR, whose colons are not a port)."""
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def check_lists(allow: Sequence[str] | None, deny: Sequence[str] | None) -> None:
    """Raise EgressError unless at most one list is given and every entry is valid."""
    if allow is not None and deny is not None:
        raise EgressError("network_allowlist and network_denylist are mutually exclusive; "
                          "provide at most one")  # fmt: skip
    for name, entries in (("network_allowlist", allow), ("network_denylist", deny)):
        if entries is None:
            continue
        if len(entries) > MAX_ENTRIES:
            raise EgressError(f"{name} supports at most {MAX_ENTRIES} entries")
        for entry in entries:
            try:
                check_entry(entry)
            except EgressError as exc:
                raise EgressError(f"{name}: {exc}") from None

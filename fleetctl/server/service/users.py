"""Whom an image's `User` (or a command's `user`) names, resolved as `docker run` does
against the sandbox's own /etc/passwd and /etc/group:

    "" root 0          root
    app  1000          the user (by name, or by id with or without a passwd entry),
                       its primary group and home from passwd, its supplementary groups
                       from the group file's member lists
    app:staff  1000:50 the user with that group, and no supplementary groups

A name that the files do not have, or an id past the sandbox's range, is refused with
the reason Docker gives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from fleetctl.server.images.unpack import find
from fleetctl.server.runtime.base import ID_RANGE, ROOT, User

#: The most of /etc/passwd or /etc/group read (a hostile image may make them huge).
MAX_FILE = 4 * 1024 * 1024
PASSWD = PurePosixPath("etc/passwd")
_NUMBER = re.compile(r"[0-9]{1,10}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
GROUP = PurePosixPath("etc/group")


class UnknownUser(ValueError):
    """The user or group cannot be resolved; the message says why."""


def resolve(spec: str, passwd: str, group: str) -> User:
    """The `User` that `spec` ("name", "uid", either with ":group" or ":gid") names."""
    spec = spec.strip()
    if not spec:
        return ROOT
    name, _, group_name = spec.partition(":")
    users = _entries(passwd, 7)
    if _NUMBER.fullmatch(name):
        entry = next((e for e in users if e[2] == name), None)
    else:
        entry = next((e for e in users if e[0] == name), None)
        if entry is None:
            raise UnknownUser(f"unable to find user {name}: no matching entries in passwd file")
    groups = _entries(group, 4)
    uid = _id(entry[2] if entry else name, spec)
    gid = _id(entry[3], spec) if entry and _NUMBER.fullmatch(entry[3]) else 0
    extra: list[int] = []
    if _NUMBER.fullmatch(group_name):
        gid = _id(group_name, spec)
    elif group_name:
        found = next((e for e in groups if e[0] == group_name), None)
        if found is None:
            raise UnknownUser(
                f"unable to find group {group_name}: no matching entries in group file"
            )
        gid = _id(found[2], spec)
    elif entry is not None:  # as Docker: member groups only when no group is named
        for item in groups:
            number = int(item[2]) if _NUMBER.fullmatch(item[2]) else ID_RANGE
            if entry[0] in item[3].split(",") and number < ID_RANGE and number != gid:
                extra.append(number)
    home = entry[5] if entry and entry[5].startswith("/") else ("/root" if uid == 0 else "/")
    return User(uid, gid, tuple(dict.fromkeys(extra)), home)


def image_user(spec: str, layers: Sequence[Path]) -> User:
    """The `User` an image's config names, from the image's own passwd and group files
    (its layers, bottom first)."""
    if not spec.strip():
        return ROOT
    return resolve(spec, _read(layers, PASSWD), _read(layers, GROUP))


def _read(layers: Sequence[Path], path: PurePosixPath) -> str:
    found = find(layers, path)
    if found is None or not found.is_file() or found.is_symlink():
        return ""
    with open(found, "rb") as file:
        return file.read(MAX_FILE).decode("utf-8", "replace")


def _entries(text: str, fields: int) -> list[list[str]]:
    """The lines of a passwd-style file that have `fields` colon-separated fields and no
    control character (a home with a NUL or newline must never reach an argument list)."""
    parsed = (line.split(":") for line in text.splitlines()
              if not line.startswith("#") and not _CONTROL.search(line))  # fmt: skip
    return [entry for entry in parsed if len(entry) == fields]


def _id(text: str, spec: str) -> int:
    number = int(text) if _NUMBER.fullmatch(text) else -1
    if not 0 <= number < ID_RANGE:
        raise UnknownUser(
            f"user {spec!r}: id {text} is outside the ids 0-{ID_RANGE - 1} a sandbox has"
        )
    return number

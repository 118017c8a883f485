"""An image's `User` resolved against its own passwd and group files, as Docker does."""

from __future__ import annotations

import pytest

from fleetctl.server.runtime.base import User
from fleetctl.server.service.users import UnknownUser, resolve

PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nbad line\n"
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:other,app\nwheel:x:10:app\n"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", User()),
        ("root", User()),
        ("app", User(1000, 1000, (50, 10), "/home/app")),
        ("1000", User(1000, 1000, (50, 10), "/home/app")),
        ("app:staff", User(1000, 50, (), "/home/app")),
        ("app:7", User(1000, 7, (), "/home/app")),
        ("4321", User(4321, 0, (), "/")),
        ("4321:wheel", User(4321, 10, (), "/")),
    ],
)
def test_docker_user_forms(spec: str, expected: User) -> None:
    assert resolve(spec, PASSWD, GROUP) == expected
    assert User.decode(expected.encode()) == expected  # as a sandbox's record keeps it


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("ghost", "unable to find user ghost: no matching entries in passwd file"),
        ("app:nogroup", "unable to find group nogroup: no matching entries in group file"),
        ("70000", "outside the ids 0-65535"),
        ("app:99999", "outside the ids 0-65535"),
        ("²", "unable to find user ²"),  # a digit to str.isdigit, not a number
    ],
)
def test_what_cannot_be_resolved_is_refused_with_dockers_reason(spec: str, reason: str) -> None:
    with pytest.raises(UnknownUser, match=reason):
        resolve(spec, PASSWD, GROUP)


def test_a_hostile_passwd_line_is_ignored_not_passed_on() -> None:
    """A home holding a NUL would split into further bwrap arguments (--setenv HOME);
    such a line is no entry at all."""
    hostile = "evil:x:1000:1000::/home/x\0--ro-bind\0/\0/host:/bin/sh\n"
    with pytest.raises(UnknownUser, match="unable to find user evil"):
        resolve("evil", hostile, "")
    assert resolve("1000", hostile, "").home == "/"

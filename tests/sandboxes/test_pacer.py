"""The SDK's adaptive pacer, with a fake clock: no pacing until throttled, then slots."""

from __future__ import annotations

import pytest

from fleetctl.sandboxes._retry import Pacer, lane


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_nothing_is_paced_until_the_first_429() -> None:
    pacer = Pacer(Clock())
    assert [pacer.reserve("create") for _ in range(50)] == [0.0] * 50


def test_after_a_429_waiting_calls_get_distinct_slots_at_the_hinted_rate() -> None:
    clock = Clock()
    pacer = Pacer(clock)
    pacer.throttled("create", retry_after=0.05)  # a drained bucket at 20/s hints 50 ms
    waits = [pacer.reserve("create") for _ in range(4)]
    assert waits == pytest.approx([0.05, 0.10, 0.15, 0.20])
    assert pacer.reserve("default") == 0.0  # other endpoint classes are not slowed


def test_429s_from_the_same_burst_slow_down_once_later_ones_again() -> None:
    clock = Clock()
    pacer = Pacer(clock)
    for _ in range(30):  # one burst of refusals: one adjustment
        pacer.throttled("create", retry_after=0.05)
    clock.now += 10
    first = pacer.reserve("create")
    second = pacer.reserve("create")
    assert second - first == pytest.approx(1 / 20)
    clock.now += 2
    pacer.throttled("create", retry_after=None)
    clock.now += 10
    gap = -pacer.reserve("create") + pacer.reserve("create")
    assert gap == pytest.approx(1 / (20 * Pacer.SLOWDOWN))


def test_successes_speed_the_rate_back_up() -> None:
    clock = Clock()
    pacer = Pacer(clock)
    pacer.throttled("create", retry_after=0.1)  # 10/s
    for _ in range(20):
        clock.now += 1
        pacer.succeeded("create")
    clock.now += 10
    gap = -pacer.reserve("create") + pacer.reserve("create")
    assert gap < 1 / 10


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [("POST", "/sandbox", "create"), ("POST", "/sandbox/x/auth", "default"),
     ("POST", "http://h/gw/local/x/exec", "exec"), ("GET", "/sandbox", "default")],
)  # fmt: skip
def test_lanes_follow_the_servers_endpoint_classes(method: str, path: str, expected: str) -> None:
    assert lane(method, path) == expected

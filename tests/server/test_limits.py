"""Rate limiting and fault injection middlewares, through a recording ASGI app."""

from __future__ import annotations

import random
import socket

import anyio
import httpx
import pytest
import uvicorn
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetctl.server.faults import (
    FaultConfig,
    FaultMiddleware,
    FaultStats,
    InjectedReset,
    parse_faults,
)
from fleetctl.server.ratelimit import (
    Rate,
    RateClass,
    RateLimitMiddleware,
    classify,
    parse_rate_limits,
)

EXEC = "/gw/alice/job-1/exec"
SANDBOXES = "/api/v1/sandbox"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn, used by the real-socket test, runs on asyncio only


class Recorder:
    """An ASGI app that answers 200 "ok" (or {"ok": true}) and records each request."""

    def __init__(self, *, json: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.json = json

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append((scope["method"], scope["path"]))
        answer = JSONResponse({"ok": True}) if self.json else PlainTextResponse("ok")
        await answer(scope, receive, send)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SleepRecorder:
    """Stands in for anyio.sleep: records delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class KillRecorder:
    """Stands in for the server's kill callback: records one draw from each Random given."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    async def __call__(self, rng: random.Random) -> None:
        self.draws.append(rng.random())


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- parsing rate limits ---------------------------------------------------------------


def test_parse_rate_limits_reads_classes_and_both_units() -> None:
    limits = parse_rate_limits(" create=10/s, exec=30/m ,default=2.5/s,")
    assert limits.rates == {
        "create": Rate(10, "s"),
        "exec": Rate(30, "m"),
        "default": Rate(2.5, "s"),
    }
    assert limits.rates["exec"].per_second == 0.5
    assert [str(rate) for rate in limits.rates.values()] == ["10/s", "30/m", "2.5/s"]


@pytest.mark.parametrize("text", ["", "  "])
def test_parse_rate_limits_empty_means_unlimited(text: str) -> None:
    limits = parse_rate_limits(text)
    assert limits.rates == {}
    assert limits.rate_for("create") is None


def test_class_without_own_rate_borrows_default_else_is_unlimited() -> None:
    with_default = parse_rate_limits("create=10/s,default=200/s")
    assert with_default.rate_for("create") == Rate(10, "s")
    assert with_default.rate_for("exec") == Rate(200, "s")
    assert parse_rate_limits("create=10/s").rate_for("exec") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("crate=1/s", "unknown class 'crate' (expected one of create, exec, list, delete"),
        ("create=0/s", "bad rate '0/s' for create (expected N/s or N/m with N > 0)"),
        ("create=-1/s", "bad rate '-1/s' for create"),
        ("create=nan/s", "bad rate 'nan/s' for create"),
        ("create=10/h", "bad rate '10/h' for create"),
        ("create=ten/s", "bad rate 'ten/s' for create"),
        ("create=10", "bad rate '10' for create"),
        ("create", "'create' is not KEY=VALUE"),
        ("=1/s", "'=1/s' is not KEY=VALUE"),
        ("create=1/s,create=2/s", "'create' is given more than once"),
    ],
)
def test_parse_rate_limits_names_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid rate limits: ") as info:
        parse_rate_limits(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_rate_limits_reports_every_problem_in_written_order() -> None:
    with pytest.raises(ValueError, match=r"^invalid rate limits: ") as info:
        parse_rate_limits("crate=1/s,default=200/s,exec=x")
    assert str(info.value).endswith(
        "unknown class 'crate' (expected one of create, exec, list, delete, default); "
        "bad rate 'x' for exec (expected N/s or N/m with N > 0)"
    )


@pytest.mark.parametrize(
    ("method", "path", "cls"),
    [
        ("POST", "/api/v1/sandbox", "create"),
        ("POST", "/api/v1/sandbox/", "create"),
        ("GET", "/api/v1/sandbox", "list"),
        ("DELETE", "/api/v1/sandbox", "delete"),
        ("DELETE", "/api/v1/sandbox/sb-1", "delete"),
        ("POST", "/gw/alice/job-1/exec", "exec"),
        ("GET", "/gw/alice/job-1/exec", "default"),
        ("POST", "/gw/alice/job-1/upload", "default"),
        ("POST", "/gw/alice/exec", "default"),
        ("GET", "/api/v1/sandbox/sb-1", "default"),
        ("POST", "/api/v1/sandbox/sb-1/restart", "default"),
        ("DELETE", "/api/v1/sandboxes", "default"),
    ],
)
def test_classify_maps_endpoints_to_rate_classes(method: str, path: str, cls: RateClass) -> None:
    assert classify(method, path) == cls


# --- rate limiting ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_bucket_holds_one_seconds_worth_then_429s_until_refilled() -> None:
    app, clock = Recorder(), FakeClock()
    limited = RateLimitMiddleware(app, parse_rate_limits("create=3/s"), clock=clock)
    async with client(limited) as http:
        for _ in range(3):
            assert (await http.post(SANDBOXES)).status_code == 200
        refused = await http.post(SANDBOXES)
        assert refused.status_code == 429
        assert refused.json() == {
            "detail": "rate limit exceeded for create (3/s); retry after 0.334s"
        }
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["retry-after-ms"] == "334"
        assert len(app.calls) == 3  # the refused request never reached the app

        clock.now += 0.334  # exactly what retry-after-ms promised
        assert (await http.post(SANDBOXES)).status_code == 200
        assert (await http.post(SANDBOXES)).status_code == 429


@pytest.mark.anyio
async def test_fractional_tokens_accumulate_and_set_the_wait() -> None:
    app, clock = Recorder(), FakeClock()
    limited = RateLimitMiddleware(app, parse_rate_limits("default=2.5/s"), clock=clock)
    async with client(limited) as http:
        statuses = [(await http.get("/api/v1/sandbox/sb-1")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        # 0.5 token is left, so the next one is 0.5 / 2.5 = 0.2 s away, not a full 0.4 s.
        refused = await http.get("/api/v1/sandbox/sb-1")
        assert refused.headers["retry-after-ms"] == "200"
        clock.now += 0.199
        assert (await http.get("/api/v1/sandbox/sb-1")).status_code == 429
        clock.now += 0.001
        assert (await http.get("/api/v1/sandbox/sb-1")).status_code == 200


@pytest.mark.anyio
async def test_slow_rate_gets_a_burst_of_one_and_whole_second_retry_after() -> None:
    clock = FakeClock()
    limited = RateLimitMiddleware(Recorder(), parse_rate_limits("exec=30/m"), clock=clock)
    async with client(limited) as http:
        assert (await http.post(EXEC)).status_code == 200
        refused = await http.post(EXEC)
        assert refused.status_code == 429
        assert (refused.headers["Retry-After"], refused.headers["retry-after-ms"]) == ("2", "2000")
        assert refused.json()["detail"] == "rate limit exceeded for exec (30/m); retry after 2s"
        # Other data-plane calls are not exec and, with no default, are unlimited.
        assert (await http.post("/gw/alice/job-1/upload")).status_code == 200


@pytest.mark.anyio
async def test_buckets_are_per_api_key_and_keyless_requests_share_one() -> None:
    limited = RateLimitMiddleware(Recorder(), parse_rate_limits("create=1/s"), clock=FakeClock())
    async with client(limited) as http:
        assert (await http.post(SANDBOXES, headers=bearer("alice"))).status_code == 200
        assert (await http.post(SANDBOXES, headers=bearer("alice"))).status_code == 429
        assert (await http.post(SANDBOXES, headers=bearer("bob"))).status_code == 200
        assert (await http.post(SANDBOXES)).status_code == 200
        assert (await http.post(SANDBOXES)).status_code == 429
        # A non-bearer Authorization header carries no API key.
        basic = {"Authorization": "Basic Ym9iOng="}
        assert (await http.post(SANDBOXES, headers=basic)).status_code == 429


@pytest.mark.anyio
async def test_each_class_has_its_own_bucket_even_when_borrowing_default() -> None:
    limited = RateLimitMiddleware(
        Recorder(), parse_rate_limits("create=1/s,default=1/s"), clock=FakeClock()
    )
    async with client(limited) as http:
        assert (await http.post(SANDBOXES)).status_code == 200
        assert (await http.post(SANDBOXES)).status_code == 429
        assert (await http.get(SANDBOXES)).status_code == 200
        refused = await http.get(SANDBOXES)
        assert refused.json()["detail"].startswith("rate limit exceeded for list (1/s)")
        assert (await http.delete(f"{SANDBOXES}/sb-1")).status_code == 200


@pytest.mark.anyio
async def test_health_and_non_api_paths_are_never_limited() -> None:
    app = Recorder()
    limited = RateLimitMiddleware(app, parse_rate_limits("default=1/s"), clock=FakeClock())
    async with client(limited) as http:
        for path in ("/api/v1/health", "/docs", "/openapi.json", "/gwx/a", "/api/v10/x"):
            for _ in range(5):
                assert (await http.get(path)).status_code == 200, path
        assert (await http.get("/api/v1/sandbox/sb-1")).status_code == 200
        assert (await http.get("/api/v1/sandbox/sb-1")).status_code == 429
    assert len(app.calls) == 26


@pytest.mark.anyio
async def test_empty_rate_limits_pass_everything() -> None:
    app = Recorder()
    limited = RateLimitMiddleware(app, parse_rate_limits(""), clock=FakeClock())
    async with client(limited) as http:
        for _ in range(50):
            assert (await http.post(SANDBOXES)).status_code == 200
    assert len(app.calls) == 50


# --- parsing faults --------------------------------------------------------------------


def test_parse_faults_reads_every_key() -> None:
    text = "error=0.1,reset=0.05,latency=50ms..2s,kill_sandbox=0.01,seed=7,scope=data"
    assert parse_faults(text) == FaultConfig(
        error=0.1, reset=0.05, latency=(0.05, 2.0), kill_sandbox=0.01, seed=7, scope="data"
    )


@pytest.mark.parametrize(
    ("text", "latency"),
    [("latency=100ms", (0.1, 0.1)), ("latency=1.5s", (1.5, 1.5)), ("latency=0ms..1s", (0, 1))],
)
def test_parse_faults_reads_single_latency_and_ranges(
    text: str, latency: tuple[float, float]
) -> None:
    assert parse_faults(text).latency == latency


@pytest.mark.parametrize("text", ["", " "])
def test_parse_faults_empty_injects_nothing(text: str) -> None:
    assert parse_faults(text) == FaultConfig(
        error=0, reset=0, latency=(0, 0), kill_sandbox=0, seed=0, scope="all"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("error=1.5", "bad probability '1.5' for error (expected 0..1)"),
        ("reset=-0.1", "bad probability '-0.1' for reset"),
        ("kill_sandbox=often", "bad probability 'often' for kill_sandbox"),
        ("latency=2s..50ms", "bad latency '2s..50ms' (expected LOW..HIGH or one value"),
        ("latency=50", "bad latency '50'"),
        ("latency=5h", "bad latency '5h'"),
        ("latency=1s..", "bad latency '1s..'"),
        ("seed=x", "bad seed 'x' (expected an integer)"),
        ("scope=both", "bad scope 'both' (expected one of all, control, data)"),
        ("boom=1", "unknown key 'boom' (expected error, reset, after, latency, kill_sandbox"),
        ("error=0.6,reset=0.5", "error + reset must not exceed 1"),
        ("seed=1,seed=2", "'seed' is given more than once"),
        ("error", "'error' is not KEY=VALUE"),
    ],
)
def test_parse_faults_names_the_bad_part(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^invalid faults: ") as info:
        parse_faults(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --- fault injection -------------------------------------------------------------------


@pytest.mark.anyio
async def test_error_fault_answers_5xx_json_without_calling_the_app() -> None:
    app = Recorder()
    faulty = FaultMiddleware(app, parse_faults("error=1,seed=3"), sleep=SleepRecorder())
    async with client(faulty) as http:
        responses = [await http.post(SANDBOXES) for _ in range(30)]
    assert {response.status_code for response in responses} == {500, 502, 503}
    for response in responses:
        assert response.json() == {
            "detail": f"injected fault: HTTP {response.status_code}; the request was not handled"
        }
    assert app.calls == []
    assert faulty.total() == FaultStats(requests=30, error=30)


@pytest.mark.anyio
async def test_reset_sends_a_truncated_response_then_raises_without_calling_the_app() -> None:
    app = Recorder()
    faulty = FaultMiddleware(app, parse_faults("reset=1"), sleep=SleepRecorder())
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "method": "POST", "path": SANDBOXES, "headers": []}
    with pytest.raises(InjectedReset):
        await faulty(scope, receive, send)

    start, body = sent
    assert start["type"] == "http.response.start"
    promised = int(dict(start["headers"])[b"content-length"])
    assert body["type"] == "http.response.body"
    assert body["more_body"] is True
    assert 0 < len(body["body"]) < promised
    assert app.calls == []
    assert faulty.total() == FaultStats(requests=1, reset=1)


@pytest.mark.anyio
async def test_reset_reaches_a_real_client_as_a_protocol_error() -> None:
    app = Recorder()
    faulty = FaultMiddleware(app, parse_faults("reset=1"))
    server = uvicorn.Server(uvicorn.Config(faulty, lifespan="off", log_config=None))
    with socket.socket() as sock:
        # Listening before the server starts: the client's connect waits in the backlog,
        # so there is no startup race to sleep through.
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.serve, [sock])
            try:
                async with httpx.AsyncClient() as http:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await http.post(f"http://127.0.0.1:{port}{SANDBOXES}")
            finally:
                server.should_exit = True
    assert app.calls == []


@pytest.mark.anyio
async def test_latency_sleeps_within_the_range_then_handles_the_request() -> None:
    app, sleep = Recorder(), SleepRecorder()
    faulty = FaultMiddleware(app, parse_faults("latency=50ms..2s"), sleep=sleep)
    async with client(faulty) as http:
        for _ in range(20):
            assert (await http.post(EXEC)).status_code == 200
    assert len(sleep.delays) == 20
    assert all(0.05 <= delay <= 2.0 for delay in sleep.delays)
    assert len(set(sleep.delays)) == 20  # drawn, not fixed
    assert len(app.calls) == 20
    assert faulty.total() == FaultStats(requests=20, latency=20)


@pytest.mark.parametrize(
    ("scope", "faulted", "spared"),
    [
        ("data", EXEC, SANDBOXES),
        ("control", SANDBOXES, EXEC),
        ("all", SANDBOXES, "/api/v1/health"),
        ("all", EXEC, "/docs"),
    ],
)
@pytest.mark.anyio
async def test_scope_selects_which_requests_are_eligible(
    scope: str, faulted: str, spared: str
) -> None:
    app = Recorder()
    faulty = FaultMiddleware(app, parse_faults(f"error=1,scope={scope}"))
    async with client(faulty) as http:
        assert (await http.get(spared)).status_code == 200
        assert (await http.get(faulted)).status_code >= 500
    assert app.calls == [("GET", spared)]
    assert faulty.total() == FaultStats(requests=1, error=1)


@pytest.mark.anyio
async def test_kill_sandbox_calls_the_callback_and_still_handles_the_request() -> None:
    app, kill = Recorder(), KillRecorder()
    faulty = FaultMiddleware(app, parse_faults("kill_sandbox=1"), kill_random_sandbox=kill)
    async with client(faulty) as http:
        for _ in range(3):
            assert (await http.get(SANDBOXES)).status_code == 200
    assert len(kill.draws) == 3
    assert len(set(kill.draws)) == 3  # each kill gets a freshly seeded Random
    assert len(app.calls) == 3
    assert faulty.total() == FaultStats(requests=3, kill_sandbox=3)


@pytest.mark.anyio
async def test_kill_sandbox_without_a_callback_is_neither_done_nor_counted() -> None:
    app = Recorder()
    faulty = FaultMiddleware(app, parse_faults("kill_sandbox=1"))
    async with client(faulty) as http:
        assert (await http.get(SANDBOXES)).status_code == 200
    assert faulty.total() == FaultStats(requests=1)


async def run_chaos(seed: int) -> tuple[list[str], list[float], list[float], FaultStats]:
    """Send a fixed mix of requests through a fresh FaultMiddleware and record its choices."""
    sleep, kill = SleepRecorder(), KillRecorder()
    config = parse_faults(
        f"error=0.3,reset=0.2,latency=10ms..1s,kill_sandbox=0.2,seed={seed},scope=all"
    )
    faulty = FaultMiddleware(Recorder(), config, kill_random_sandbox=kill, sleep=sleep)
    outcomes: list[str] = []
    async with client(faulty) as http:
        for i in range(40):
            path = (SANDBOXES, EXEC, "/api/v1/health")[i % 3]
            try:
                outcomes.append(str((await http.post(path)).status_code))
            except InjectedReset:
                outcomes.append("reset")
    return outcomes, sleep.delays, kill.draws, faulty.total()


@pytest.mark.anyio
async def test_same_seed_and_requests_replay_the_same_faults() -> None:
    first = await run_chaos(seed=7)
    assert first == await run_chaos(seed=7)
    outcomes, delays, kills, stats = first
    # The run exercised every kind of fault, so the comparison above means something.
    assert {"200", "reset"} <= set(outcomes)
    assert {"500", "502", "503"} & set(outcomes)
    assert kills
    # Health probes (every third request) are neither faulted nor drawn for.
    assert stats.requests == len(delays) == 27
    assert outcomes[2::3] == ["200"] * 13
    assert stats.error == sum(outcome.startswith("5") for outcome in outcomes)
    assert stats.reset == outcomes.count("reset")
    assert stats.kill_sandbox == len(kills)


@pytest.mark.anyio
async def test_different_seeds_make_different_faults() -> None:
    assert await run_chaos(seed=7) != await run_chaos(seed=8)


@pytest.mark.anyio
async def test_after_fault_handles_the_request_then_loses_its_response() -> None:
    """`after` lets the app do the work, then either cuts the connection mid-response or
    answers a 200 whose JSON body does not parse: the client cannot tell the work was done.
    An answer that is not JSON (a download) is always cut, never garbled."""
    app = Recorder(json=True)
    faulty = FaultMiddleware(app, parse_faults("after=1,seed=5"), sleep=SleepRecorder())
    outcomes: list[str] = []
    async with client(faulty) as http:
        for _ in range(20):
            try:
                response = await http.post(SANDBOXES)
            except InjectedReset:
                outcomes.append("dropped")
                continue
            assert response.status_code == 200
            with pytest.raises(ValueError, match=r"Expecting value|Invalid"):
                response.json()
            outcomes.append("garbled")
    assert len(app.calls) == 20, "every request was handled before its response was lost"
    assert {"dropped", "garbled"} == set(outcomes)
    assert faulty.total() == FaultStats(requests=20, after=20)
    plain = FaultMiddleware(Recorder(), parse_faults("after=1,seed=5"), sleep=SleepRecorder())
    async with client(plain) as http:
        for _ in range(10):
            with pytest.raises(InjectedReset):
                await http.get(EXEC)


@pytest.mark.anyio
async def test_after_leaves_the_error_and_reset_sequence_of_a_seed_unchanged() -> None:
    """`after` draws from a stream of its own: adding it moves no other fault."""

    async def outcomes(spec: str) -> list[str]:
        faulty = FaultMiddleware(Recorder(), parse_faults(spec), sleep=SleepRecorder())
        seen: list[str] = []
        async with client(faulty) as http:
            for _ in range(60):
                try:
                    status = (await http.post(SANDBOXES)).status_code
                    seen.append("5xx" if status >= 500 else "other")
                except InjectedReset:
                    seen.append("reset-or-dropped")
        return seen

    without = await outcomes("error=0.2,reset=0.1,seed=9")
    with_after = await outcomes("error=0.2,reset=0.1,after=0.3,seed=9")
    assert [o == "5xx" for o in without] == [o == "5xx" for o in with_after]
    assert with_after.count("reset-or-dropped") > without.count("reset-or-dropped") > 0


@pytest.mark.anyio
async def test_faults_are_counted_per_api_key_without_naming_the_key() -> None:
    faulty = FaultMiddleware(Recorder(), parse_faults("error=1"), sleep=SleepRecorder())
    async with client(faulty) as http:
        for key, times in (("key-under-test", 3), ("oracle-key", 2)):
            for _ in range(times):
                await http.get(SANDBOXES, headers=bearer(key))
    counts = sorted(stats.error for stats in faulty.stats.values())
    assert counts == [2, 3]
    assert not any("key" in name for name in faulty.stats), "a key itself was shown"
    assert faulty.total() == FaultStats(requests=5, error=5)

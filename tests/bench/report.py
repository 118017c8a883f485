"""Regenerate the README's benchmark table from one run of every benchmark script.

    python tests/bench/report.py [--dry-run] [--quick]

Runs, one after another, each as a subprocess of this interpreter from the repository
root: ``local_runtime.py``, ``sdk_fanout.py --n 100 --rate 20``, ``apply_throughput.py
--n 300 --rate 25``, ``exec_transports.py``, ``checkpoint_fanout.py``, ``image_pull.py``
(needs skopeo and umoci), ``network.py``, ``plan_scale.py`` and ``reliability_report.py``
(short). Their output is passed through as it comes; the last line of each is its figures. Then the
block of README.md between ``<!-- BEGIN bench -->`` and ``<!-- END bench -->`` is
rewritten: a line saying when (UTC) and on what (CPU model, cores, memory, kernel) it was
measured, and the table, one row per script with its last line.

A script that exits non-zero (or runs past its time limit, then it is interrupted with
SIGINT so that it stops its servers), or whose last line is not ``key=value`` figures,
stops the report: it names the script, exits 1 and leaves README.md as it was.

    --dry-run  print the block instead of writing README.md
    --quick    small sizes, to check that the scripts and this report work; its figures
               are not the README's, so it needs --dry-run
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BEGIN, END = "<!-- BEGIN bench -->", "<!-- END bench -->"
FIGURE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S+")
#: How long SIGINT gives a script to stop its servers before it is killed.
STOP_GRACE_S = 60


@dataclass(frozen=True)
class Bench:
    script: str
    args: tuple[str, ...]
    what: str
    limit_s: float  # the script is interrupted after this long


def benches(quick: bool) -> list[Bench]:
    if quick:
        return [
            Bench("local_runtime.py", ("--sandboxes", "5", "--commands", "20"),
                  "5 sandboxes, 20 commands through the API", 300),
            Bench("sdk_fanout.py", ("--n", "30", "--rate", "10"),
                  "create, wait, exec, delete 30 sandboxes under `create=10/s`, ours vs the "
                  "official 0.5.1 SDK", 300),
            Bench("apply_throughput.py", ("--n", "30", "--rate", "10"),
                  "`apply` of 30 sandboxes under `create=10/s`", 300),
            Bench("exec_transports.py", ("--commands", "30"),
              "30 commands on one sandbox, Connect vs REST", 300),
        Bench("checkpoint_fanout.py", ("--n", "10", "--size-mb", "20"),
              "10 sandboxes with 20 MiB of setup each: from a checkpoint vs set up each", 300),
        Bench("image_pull.py", ("--mb", "10", "--creates", "5"),
              "10 MB image: pull vs skopeo + umoci, create from it vs the host's root", 300),
        Bench("network.py", ("--creates", "5", "--fleet", "10", "--mb", "20"),
              "create with network on vs off, 10 networked at once, a 20 MB download", 300),
        Bench("plan_scale.py", ("--n", "1000"),
                  "plan 1,000 desired against 1,000 live, in memory", 300),
            Bench("reliability_report.py", (),
                  "soak (2 rounds of 12) and crash scenarios under faults, short", 900),
        ]  # fmt: skip
    return [
        Bench("local_runtime.py", (), "50 sandboxes, 200 warm commands through the API, the "
              "first command of 20 others (each starts its exec helper)", 900),
        Bench("sdk_fanout.py", ("--n", "100", "--rate", "20"),
              "create, wait, exec, delete 100 sandboxes under `create=20/s`, ours vs the "
              "official 0.5.1 SDK", 900),
        Bench("apply_throughput.py", ("--n", "300", "--rate", "25"),
              "`apply` of 300 sandboxes under `create=25/s`", 900),
        Bench("exec_transports.py", (),
              "300 commands on one sandbox, over Connect vs over REST, alternating", 600),
        Bench("checkpoint_fanout.py", (),
              "300 sandboxes with 200 MiB of setup each: from a checkpoint of one set-up "
              "sandbox vs created bare and set up each", 1800),
        Bench("image_pull.py", (),
              "a 50 MB image from a loopback registry: pull + unpack vs skopeo copy + umoci "
              "unpack; create from it vs on the host's root filesystem; disk of a second "
              "image sharing its base", 900),
        Bench("network.py", (),
              "create → RUNNING with network on vs off (30 each, alternating); 200 networked "
              "sandboxes at once; a 200 MB download from the test internet in a sandbox vs "
              "on the host", 900),
        Bench("plan_scale.py", (), "plan 10,000 desired against 10,000 live, in memory", 900),
        Bench("reliability_report.py", (),
              "soak (2 rounds of apply/destroy of 12 sandboxes under injected faults and "
              "`create=20/s`), an apply and the server SIGKILLed mid-apply then re-run", 1800),
    ]  # fmt: skip


def command(bench: Bench) -> str:
    return " ".join((bench.script, *bench.args))


def run(bench: Bench) -> str:
    """Run one script, passing its output through; its last line, or SystemExit."""
    print(f"== {command(bench)}", flush=True)
    process = subprocess.Popen(
        [sys.executable, str(Path("tests") / "bench" / bench.script), *bench.args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []

    def pass_through() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            print(f"   {line}", end="", flush=True)
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pass_through, daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        code = process.wait(timeout=bench.limit_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # KeyboardInterrupt: its `finally` stops servers
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=5)
        raise SystemExit(f"{command(bench)} ran past {bench.limit_s:g} s and was stopped") from None
    reader.join(timeout=5)
    print(f"== {command(bench)}: exit {code} in {time.monotonic() - started:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"{command(bench)} exited {code} (its output is above)")
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    if not last or not all(FIGURE.fullmatch(word) for word in last.split()):
        raise SystemExit(f"{command(bench)}: its last line is not key=value figures: {last!r}")
    return last


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 0


def block(rows: list[tuple[Bench, str]], started: datetime, minutes: float, load: float) -> str:
    measured = (
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {cpu_model()}, {cores()} cores, "
        f"{memory_gib():.1f} GiB memory, Linux {platform.release()} (1-min load average "
        f"{load:.2f} at the start), in one run of `python tests/bench/report.py` "
        f"({minutes:.0f} min):"
    )
    measured = textwrap.fill(measured, 90, break_long_words=False, break_on_hyphens=False)
    table = ["| script | what | last line |", "|---|---|---|"]
    table += [f"| `{command(bench)}` | {bench.what} | `{last}` |" for bench, last in rows]
    return "\n".join([BEGIN, measured, "", *table, END])


def rewrite(text: str, new_block: str) -> str:
    """`text` with its one BEGIN…END bench block (markers included) replaced."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"README.md needs exactly one {BEGIN} and one {END}")
    head, rest = text.split(BEGIN)
    if END not in rest:
        raise SystemExit(f"README.md: {END} comes before {BEGIN}")
    _, tail = rest.split(END)
    return head + new_block + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print instead of writing")
    parser.add_argument("--quick", action="store_true", help="small sizes (needs --dry-run)")
    args = parser.parse_args()
    if args.quick and not args.dry_run:
        parser.error("--quick figures are not the README's: add --dry-run")
    if not args.dry_run:
        rewrite(README.read_text(), "")  # the markers are checked before the long run
    started, load = datetime.now(UTC), os.getloadavg()[0]
    clock = time.monotonic()
    rows = [(bench, run(bench)) for bench in benches(args.quick)]
    new_block = block(rows, started, (time.monotonic() - clock) / 60, load)
    if args.dry_run:
        print(new_block)
        return
    README.write_text(rewrite(README.read_text(), new_block))
    print(f"rewrote the benchmark table of {README}")


if __name__ == "__main__":
    main()

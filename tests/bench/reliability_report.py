"""Reliability report: the soak and crash scenarios for one seed (not run by the suite).

    python tests/bench/reliability_report.py [--long] [--seed 7]

Runs, on servers of its own, the scenarios of `tests/reliability/scenarios.py`: the soak
(rounds x apply/destroy of a fleet under injected control-plane faults, creates limited
to 20/s), a `fleetctl apply` SIGKILLed at a seeded point then re-run, and the server
SIGKILLed at a seeded point mid-apply, restarted on its data dir, then the apply re-run.
Short by default (2 rounds of 12 sandboxes), long with ``--long`` (10 rounds of 100).
Prints what happened and any problem, and last one line:

    rounds=… faults_injected=… duplicates=0 leaked=0 lost=0 converged_rounds=…

    rounds            soak rounds + one per crash scenario
    faults_injected   injected errors and resets, from GET /api/v1/_fleetctl/faults
    duplicates        sandboxes beyond the first for one fleet key after an apply
    leaked            dirs, cgroups or processes left on the host after a destroy
    lost              sandboxes RUNNING before a crash, still wanted, gone after the re-run
    converged_rounds  rounds ending with one RUNNING sandbox per key and a clean plan

Exits 1 when a count is not zero, a round did not converge, or a problem was seen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable as a script

from tests.reliability.conftest import LONG, SHORT
from tests.reliability.scenarios import Tally, crash_apply, crash_server, soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--long", action="store_true", help="10 rounds of 100 sandboxes")
    parser.add_argument("--seed", type=int, default=SHORT.seed, help="seeds the kill points")
    args = parser.parse_args(argv)
    scale = LONG if args.long else SHORT
    total = Tally()
    with tempfile.TemporaryDirectory(prefix="reliability-report-") as name:
        workdir = Path(name)
        for scenario in ("soak", "crash-apply", "crash-server"):
            started = time.monotonic()
            if scenario == "soak":
                tally = soak(scale.rounds, scale.sandboxes, workdir)
            elif scenario == "crash-apply":
                tally = crash_apply(scale.sandboxes, args.seed, workdir)
            else:
                tally = crash_server(scale.sandboxes, args.seed, workdir)
            elapsed = time.monotonic() - started
            print(f"{scenario}: {tally.line()} ({elapsed:.1f}s)", flush=True)
            for note in tally.notes:
                print(f"  {note}")
            for problem in tally.problems:
                print(f"  PROBLEM {problem}")
            total.add(tally)
    print(total.line())
    clean = (total.duplicates, total.leaked, total.lost, total.problems) == (0, 0, 0, [])
    return 0 if clean and total.converged_rounds == total.rounds else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generate `command_session_pb2.py` and `.pyi` from `command_session.proto` (needs the
`grpcio-tools` test dependency, which brings protoc).

    python -m fleetctl.proto.generate [--check]

With --check nothing is written: the exit code says whether the checked-in files are
what the schema generates.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA = "command_session.proto"
OUTPUTS = ("command_session_pb2.py", "command_session_pb2.pyi")


def generate(into: Path) -> None:
    from grpc_tools import protoc  # noqa: PLC0415 - a test dependency, loaded only here

    args = ["protoc", f"-I{HERE}", f"--python_out={into}", f"--pyi_out={into}", SCHEMA]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {HERE / SCHEMA}")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        fresh = {name: (Path(scratch) / name).read_bytes() for name in OUTPUTS}
        changed = [name for name in OUTPUTS if fresh[name] != (HERE / name).read_bytes()]
        if "--check" in argv:
            for name in changed:
                print(f"{HERE / name} is not what {SCHEMA} generates", file=sys.stderr)
            return 1 if changed else 0
        for name in OUTPUTS:
            shutil.copy(Path(scratch) / name, HERE / name)
    print(f"wrote {', '.join(OUTPUTS)} from {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

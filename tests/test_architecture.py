"""The shape of the package: layers that only look down, lazy heavy imports, small modules.

Read statically (every import statement, including those inside functions) and by
importing in a fresh interpreter, so a module cannot reach above its layer either way.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fleetctl.docgen import ROOT

PACKAGE = ROOT / "fleetctl"
MAX_LINES = 450

#: Bottom to top. A module may import its own package and anything in a lower layer;
#: packages sharing a layer know nothing of each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "fleetctl.errors",
        "fleetctl.contract",
        "fleetctl.redact",
        "fleetctl.egress",
        "fleetctl.proto",
    ),
    ("fleetctl.sandboxes", "fleetctl.spec", "fleetctl.server"),
    ("fleetctl.plan",),
    ("fleetctl.apply",),
    ("fleetctl.cli",),
    ("fleetctl.docgen", "fleetctl.__main__"),
)
#: The server's own layers, bottom to top, the same way.
SERVER_LAYERS: tuple[tuple[str, ...], ...] = (
    ("options", "asgi", "api", "store", "proxy"),
    ("runtime", "images"),
    ("service", "ratelimit", "faults", "daemon"),
    ("routes",),
    ("app",),
    ("serve",),
)
#: The one place that chooses a runtime (besides the CLI's `doctor`, above it all).
COMPOSITION_ROOT = "fleetctl.server.serve"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every fleetctl module `path` names in an import, wherever the statement stands."""
    found: set[str] = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's package
                base = ".".join([*(package or module_name(path)).split(".")[: 1 - node.level],
                                 base]).strip(".")  # fmt: skip
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "fleetctl" or name.startswith("fleetctl.")}


def layer_of(name: str, layers: tuple[tuple[str, ...], ...], prefix: str = "") -> int | None:
    for index, members in enumerate(layers):
        for member in members:
            full = prefix + member
            if name == full or name.startswith(full + "."):
                return index
    return None


def top_package(name: str, layers: tuple[tuple[str, ...], ...], prefix: str = "") -> str | None:
    for members in layers:
        for member in members:
            full = prefix + member
            if name == full or name.startswith(full + "."):
                return full
    return None


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_layer_above_it_or_a_sibling(path: Path) -> None:
    name = module_name(path)
    problems = []
    for layers, prefix in ((LAYERS, ""), (SERVER_LAYERS, "fleetctl.server.")):
        own_layer, own = layer_of(name, layers, prefix), top_package(name, layers, prefix)
        if own_layer is None:
            continue
        for target in imports(path):
            target_layer = layer_of(target, layers, prefix)
            if target_layer is None or top_package(target, layers, prefix) == own:
                continue
            if target_layer >= own_layer:
                problems.append(f"{name} imports {target} (layer {target_layer} ≥ {own_layer})")
    assert problems == []


def test_only_the_composition_root_names_a_concrete_runtime() -> None:
    for path in (PACKAGE / "server").rglob("*.py"):
        name = module_name(path)
        if name == COMPOSITION_ROOT or name.startswith("fleetctl.server.runtime.bwrap"):
            continue
        named = {t for t in imports(path) if t.startswith("fleetctl.server.runtime.bwrap")}
        assert not named, f"{name} names the bubblewrap runtime: {named}"


def test_the_layer_table_knows_every_module() -> None:
    """A new top-level module must be placed in a layer, or the test above skips it."""
    names = [module_name(p) for p in MODULES]
    unplaced = [n for n in names if n != "fleetctl" and layer_of(n, LAYERS) is None]
    assert unplaced == []
    server = [n for n in names if n.startswith("fleetctl.server.")]
    assert [n for n in server if layer_of(n, SERVER_LAYERS, "fleetctl.server.") is None] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_longer_than_450_lines(path: Path) -> None:
    assert len(path.read_text().splitlines()) <= MAX_LINES


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    probe = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, cwd=ROOT)  # fmt: skip
    return set(done.stdout.split())


@pytest.mark.parametrize("package", ["fleetctl.sandboxes", "fleetctl.spec", "fleetctl.plan"])
def test_importing_the_sdk_spec_or_plan_loads_no_server_code(package: str) -> None:
    loaded = loaded_after(f"import {package}, {package}.__init__")
    if package == "fleetctl.plan":  # the whole of plan, refresh and status included
        loaded |= loaded_after("import fleetctl.plan.refresh, fleetctl.plan.status")
    heavy = ("fastapi", "uvicorn")
    assert sorted(m for m in loaded if m.startswith("fleetctl.server") or m in heavy) == []


def test_validate_loads_neither_fastapi_nor_uvicorn() -> None:
    """As `python -X importtime -m fleetctl validate specs/` shows it."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fleetctl", "validate", "specs/"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "fleetctl.spec" in imported  # the probe reads what it should
    heavy = sorted(m for m in imported if m.split(".")[0] in ("fastapi", "uvicorn", "starlette"))
    assert heavy == []

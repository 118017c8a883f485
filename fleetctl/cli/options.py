"""Arguments and options that several commands take, declared once; loading specs."""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetctl.spec import Fleet, load, load_var_file, parse_var

SpecsArg = Annotated[
    list[Path],
    typer.Argument(
        help="Spec files, or directories whose *.yaml files are all loaded.",
        metavar="SPEC",
        show_default=False,
    ),
]
VarOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--var",
        help="Set a template variable, NAME=VALUE (typed as YAML: 3 is a number). Repeatable; "
        "wins over --var-file and the spec's vars:.",
        metavar="NAME=VALUE",
        show_default=False,
    ),
]
VarFileOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--var-file",
        help="A YAML file of template variables. Repeatable; later files win.",
        metavar="FILE",
        show_default=False,
    ),
]
MaxDeleteOpt = Annotated[
    float,
    typer.Option("--max-delete", min=0.0, max=1.0,
                 help="Refuse a plan that prunes more than this fraction of running sandboxes."),
]  # fmt: skip
MassDeleteOpt = Annotated[
    bool,
    typer.Option("--allow-mass-delete", help="Allow a plan that prunes past --max-delete, or all."),
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Go ahead without asking.")]
RefreshImagesOpt = Annotated[
    bool,
    typer.Option("--refresh-images",
                 help="Ask each image's registry what its tag names now, and replace the "
                      "sandboxes whose tag moved (the local server's images)."),
]  # fmt: skip


class TextOrJson(StrEnum):
    text = "text"
    json = "json"


class TableFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


class DataFormat(StrEnum):
    yaml = "yaml"
    json = "json"


def label_option(help_text: str) -> Any:
    """`--label/-l`, repeatable: every label given must match."""
    return typer.Option("--label", "-l", help=f"{help_text} (repeatable: all must match).")


def load_fleets(
    specs: Sequence[Path], var: Sequence[str] | None, var_file: Sequence[str] | None
) -> list[Fleet]:
    """Load specs with --var-file values, then --var values, layered over the spec's vars:."""
    variables: dict[str, Any] = {}
    for path in var_file or ():
        variables.update(load_var_file(path))
    variables.update(parse_var(item) for item in var or ())
    return load([str(s) for s in specs], variables)

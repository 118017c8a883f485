"""Where the SDK sends requests: explicit arguments, then the environment, then the context.

    1. APIClient(api_key=..., base_url=...)
    2. FLEETCTL_API_URL + FLEETCTL_API_KEY
    3. the current context: FLEETCTL_CONTEXT, else `current-context` in
       ~/.config/fleetctl/config.yaml, else `local`
         local  the local server (started in the background if none answers,
                saying so in one line on stderr)
         prime  Prime Intellect's cloud: PRIME_API_KEY, PRIME_BASE_URL
         other  `contexts: {name: {url: ..., api_key_env: VAR}}` in the config file

A remote context without a key raises UnauthorizedError before any request,
naming the variable to set.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetctl.sandboxes.errors import APIError, UnauthorizedError

PRIME_DEFAULT_URL = "https://api.primeintellect.ai"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A resolved API: base URL (without /api/v1), key, and the context it came from."""

    base_url: str
    api_key: str
    context: str


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetctl" / "config.yaml"


def _config() -> dict[str, Any]:
    try:
        data = yaml.safe_load(config_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, yaml.YAMLError) as exc:
        raise APIError(f"cannot read {config_file()}: {exc}") from None
    return data if isinstance(data, dict) else {}


def resolve(
    api_key: str | None = None, base_url: str | None = None, context: str | None = None
) -> Endpoint:
    """The endpoint to use, by the order in this module's docstring."""
    if base_url:
        key = api_key or os.environ.get("FLEETCTL_API_KEY", "")
        return Endpoint(_strip(base_url), key, "explicit")
    if os.environ.get("FLEETCTL_API_URL"):
        key = api_key or os.environ.get("FLEETCTL_API_KEY", "")
        if not key:
            raise UnauthorizedError(
                "FLEETCTL_API_URL is set but FLEETCTL_API_KEY is not: set it to the API key"
            )
        return Endpoint(_strip(os.environ["FLEETCTL_API_URL"]), key, "environment")
    config = _config()
    name = context or os.environ.get("FLEETCTL_CONTEXT") or config.get("current-context") or "local"
    if name == "local":
        return _local(api_key)
    if name == "prime":
        key = api_key or os.environ.get("PRIME_API_KEY", "")
        if not key:
            raise UnauthorizedError("context 'prime' needs an API key: set PRIME_API_KEY")
        url = os.environ.get("PRIME_BASE_URL") or os.environ.get("PRIME_API_BASE_URL")
        return Endpoint(_strip(url or PRIME_DEFAULT_URL), key, "prime")
    contexts = config.get("contexts") or {}
    if not isinstance(contexts, dict):
        raise APIError(f"`contexts` in {config_file()} must be a mapping of names to contexts")
    if name not in contexts:
        known = ", ".join(["local", "prime", *contexts])
        raise APIError(f"unknown context {name!r} (known: {known}; defined in {config_file()})")
    entry = contexts[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise APIError(f"context {name!r} in {config_file()} needs a `url` (and optionally "
                       "`api_key_env`)")  # fmt: skip
    variable = str(entry.get("api_key_env", "FLEETCTL_API_KEY"))
    key = api_key or os.environ.get(variable, "")
    if not key:
        raise UnauthorizedError(f"context {name!r} needs an API key: set {variable}")
    return Endpoint(_strip(str(entry["url"])), key, name)


def _local(api_key: str | None) -> Endpoint:
    # imported here: the server (FastAPI, uvicorn) loads only for the local context
    from fleetctl.server import daemon  # noqa: PLC0415

    data_dir = daemon.default_data_dir()
    info = daemon.running(data_dir)
    if info is None:
        try:
            info = daemon.start_background(daemon.ServerOptions(data_dir=data_dir))
        except daemon.ServerError:
            # the default port may be taken (another data dir's server): any free one
            # will do, since clients find the server through the data dir
            try:
                info = daemon.start_background(daemon.ServerOptions(data_dir=data_dir, port=0))
            except daemon.ServerError as exc:
                raise APIError(f"cannot start the local sandbox server: {exc}") from None
        print(
            f"fleetctl: started the local sandbox server on {info.url} (data dir {data_dir})",
            file=sys.stderr,
        )
    return Endpoint(info.url, api_key or daemon.api_token(data_dir), "local")


def _strip(url: str) -> str:
    return url.rstrip("/").removesuffix("/api/v1")

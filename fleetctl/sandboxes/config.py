"""Where the SDK sends requests: explicit arguments, then the environment, then the context.

    1. APIClient(api_key=..., base_url=...)
    2. FLEETCTL_API_URL + FLEETCTL_API_KEY
    3. the current context: FLEETCTL_CONTEXT, else `current-context` in
       ~/.config/fleetctl/config.yaml, else `local`
         prime  Prime Intellect's cloud: PRIME_API_KEY, PRIME_BASE_URL
         other  `contexts: {name: {url: ..., api_key_env: VAR}}` in the config file
         local  and any other name a provider is registered for, by `register` or
                by an entry point in the group `fleetctl.contexts` (fleetctl's own
                package registers `local`: the local server, started in the
                background if none answers, saying so in one line on stderr)

A remote context without a key raises UnauthorizedError before any request,
naming the variable to set. The SDK names no server: a provider is found by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from fleetctl.sandboxes.errors import APIError, UnauthorizedError

PRIME_DEFAULT_URL = "https://api.primeintellect.ai"
#: Entry point group of context providers.
PROVIDER_GROUP = "fleetctl.contexts"
#: A context provider: given the caller's API key (or None), the base URL and API key
#: to use. It may start something (the local server does) and may raise APIError.
Provider = Callable[[str | None], tuple[str, str]]
_providers: dict[str, Provider] = {}


def register(name: str, provider: Provider) -> None:
    """Make context `name` resolve through `provider` (wins over an entry point)."""
    _providers[name] = provider


def _provider(name: str) -> Provider | None:
    if name in _providers:
        return _providers[name]
    for point in entry_points(group=PROVIDER_GROUP, name=name):
        provider: Provider = point.load()
        return provider
    return None


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
    contexts = config.get("contexts") or {}
    if not isinstance(contexts, dict):
        raise APIError(f"`contexts` in {config_file()} must be a mapping of names to contexts")
    provider = _provider(name) if name not in contexts else None
    if provider is not None:
        try:
            url, key = provider(api_key)
        except APIError:
            raise
        except Exception as exc:  # a provider's failure reaches SDK users as the SDK's error
            raise APIError(f"context {name!r} is not available: {exc}") from None
        return Endpoint(_strip(url), key, name)
    if name == "prime":
        key = api_key or os.environ.get("PRIME_API_KEY", "")
        if not key:
            raise UnauthorizedError("context 'prime' needs an API key: set PRIME_API_KEY")
        base = os.environ.get("PRIME_BASE_URL") or os.environ.get("PRIME_API_BASE_URL")
        return Endpoint(_strip(base or PRIME_DEFAULT_URL), key, "prime")
    if name not in contexts:
        known = ", ".join(dict.fromkeys([*_known_providers(), "prime", *contexts]))
        hint = " (is fleetctl installed? installing registers it)" if name == "local" else ""
        raise APIError(
            f"unknown context {name!r}{hint} (known: {known}; defined in {config_file()})"
        )
    entry = contexts[name]
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str):
        raise APIError(f"context {name!r} in {config_file()} needs a `url` (and optionally "
                       "`api_key_env`)")  # fmt: skip
    variable = str(entry.get("api_key_env", "FLEETCTL_API_KEY"))
    key = api_key or os.environ.get(variable, "")
    if not key:
        raise UnauthorizedError(f"context {name!r} needs an API key: set {variable}")
    return Endpoint(_strip(str(entry["url"])), key, name)


def _known_providers() -> list[str]:
    return [*_providers, *(point.name for point in entry_points(group=PROVIDER_GROUP))]


def _strip(url: str) -> str:
    return url.rstrip("/").removesuffix("/api/v1")

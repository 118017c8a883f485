"""A client of the OCI distribution API (Docker registry v2): manifests and blobs.

Anonymous, Basic and Bearer access: on a 401 the challenge in `WWW-Authenticate` says
which; a Bearer token is fetched from the challenge's realm (with the registry's
credentials, if any, as Basic) for the repository's pull scope and cached per scope.
Credentials come from the Docker client's config (`$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json`, its `auths`) and from FLEETCTL_REGISTRY_AUTH
(``host=user:password`` entries separated by spaces), the latter first. They are sent
over HTTPS only, or to a registry the server was told is plain HTTP
(`--insecure-registry`). Docker Hub may be read through mirrors (`--registry-mirror`),
tried in order before Docker Hub itself.

Everything a registry says is bounded: manifests and configs by size, blobs by the size
their descriptor gives (a blob that runs longer is refused), and a blob's bytes are
hashed as they arrive (`BlobStream`); the caller checks `verify()` before using them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fleetctl.server.images.reference import DOCKER_HUB, Reference

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT = ", ".join((*INDEX_TYPES, *MANIFEST_TYPES))
MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
#: Docker's config names Docker Hub by its old index URL.
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


class PullError(Exception):
    """The registry refused or failed the pull (not found, unauthorized, bad digest...)."""


class Unreachable(PullError):
    """No registry answered at all: no network, a DNS failure, a refused connection."""


@dataclass(frozen=True)
class RegistrySettings:
    """Where and how to reach registries: HTTP-only hosts, Docker Hub mirrors, credentials."""

    insecure: frozenset[str] = frozenset()
    mirrors: tuple[str, ...] = ()
    credentials: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def load(
        cls, insecure: tuple[str, ...], mirrors: tuple[str, ...], environ: Mapping[str, str]
    ) -> RegistrySettings:
        return cls(frozenset(insecure), mirrors, read_credentials(environ))


def read_credentials(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Registry host → (user, password), from the Docker config, then the environment."""
    found: dict[str, tuple[str, str]] = {}
    config_dir = environ.get("DOCKER_CONFIG") or str(Path(environ.get("HOME", "/root")) / ".docker")
    with contextlib.suppress(OSError, ValueError):
        auths = json.loads((Path(config_dir) / "config.json").read_text()).get("auths") or {}
        for key, entry in auths.items():
            pair = _config_pair(entry)
            if pair:
                host = key.removeprefix("https://").removeprefix("http://").split("/")[0]
                found[DOCKER_HUB if key in _HUB_KEYS or host in _HUB_KEYS else host] = pair
    for item in environ.get("FLEETCTL_REGISTRY_AUTH", "").split():
        host, _, secret = item.partition("=")
        user, colon, password = secret.partition(":")
        if host and colon:
            found[host] = (user, password)
    return found


def _config_pair(entry: Any) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    if entry.get("auth"):
        user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        return user, password
    if entry.get("username"):
        return str(entry["username"]), str(entry.get("password", ""))
    return None


@dataclass
class Manifest:
    """A manifest or index as fetched: its bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: str

    def json(self) -> dict[str, Any]:
        try:
            value = json.loads(self.data)
        except ValueError as exc:
            raise PullError(f"manifest {self.digest} is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise PullError(f"manifest {self.digest} is not a JSON object")
        return value


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class BlobStream:
    """A blob's bytes as they arrive, hashed, and cut off past the size it must have."""

    def __init__(self, chunks: Iterator[bytes], digest: str, size: int) -> None:
        self._chunks, self.digest, self.size = chunks, digest, size
        self._hash = hashlib.sha256()
        self.received = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.received += len(chunk)
            if self.received > self.size:
                raise PullError(f"blob {self.digest} is longer than the {self.size} bytes "
                                "its manifest gives")  # fmt: skip
            self._hash.update(chunk)
            yield chunk

    def verify(self) -> None:
        """Raise PullError unless every byte arrived and they hash to the digest."""
        for _ in self:  # whatever the reader left unread
            pass
        if self.received != self.size:
            raise PullError(f"blob {self.digest} ended after {self.received} of its "
                            f"{self.size} bytes")  # fmt: skip
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise PullError(f"blob {self.digest} does not match its digest (got {actual})")


class Registry:
    """One registry (or Docker Hub through its mirrors), for the pulls of one server."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self._client = httpx.Client(timeout=TIMEOUT, follow_redirects=True,
                                    transport=httpx.HTTPTransport(retries=2))  # fmt: skip
        self._tokens: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        self._client.close()

    # -- what a pull asks for ------------------------------------------------------

    def manifest(self, ref: Reference, version: str) -> Manifest:
        """The manifest or index `version` (a tag or a digest) of `ref`'s repository."""
        with self._get(ref, f"manifests/{version}", accept=ACCEPT) as response:
            data = _read_bounded(response, MAX_MANIFEST_BYTES, f"manifest of {ref}")
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
        digest = sha256(data)
        if version.startswith("sha256:") and digest != version:
            raise PullError(f"the registry's manifest for {ref} does not match its digest "
                            f"{version} (got {digest})")  # fmt: skip
        return Manifest(data, media_type or _declared_type(data), digest)

    def small_blob(self, ref: Reference, digest: str, size: int) -> bytes:
        """A config blob: read whole (it is bounded like a manifest) and verified."""
        if size > MAX_MANIFEST_BYTES:
            raise PullError(f"config {digest} of {ref} is {size} bytes, over the "
                            f"{MAX_MANIFEST_BYTES} allowed")  # fmt: skip
        with self.blob(ref, digest, size) as stream:
            data = b"".join(stream)
            stream.verify()
        return data

    @contextlib.contextmanager
    def blob(self, ref: Reference, digest: str, size: int) -> Iterator[BlobStream]:
        """The blob `digest` as a `BlobStream`; the caller reads it and calls verify()."""
        with self._get(ref, f"blobs/{digest}") as response:
            yield BlobStream(response.iter_bytes(CHUNK), digest, size)

    # -- HTTP ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _get(self, ref: Reference, path: str, accept: str = "*/*") -> Iterator[httpx.Response]:
        last: PullError | None = None
        for host in self._hosts(ref):
            try:
                with self._authorized(ref, host, path, accept) as response:
                    yield response
                    return
            except Unreachable as exc:
                last = exc  # the next mirror, or the registry itself
            except PullError as exc:
                if host == self._hosts(ref)[-1]:
                    raise
                last = exc
        assert last is not None
        raise last

    def _hosts(self, ref: Reference) -> list[str]:
        if ref.registry == DOCKER_HUB:
            return [*(m.rstrip("/") for m in self.settings.mirrors), self._base(ref.api_host)]
        return [self._base(ref.api_host)]

    def _base(self, host: str) -> str:
        scheme = "http" if host in self.settings.insecure else "https"
        return f"{scheme}://{host}"

    @contextlib.contextmanager
    def _authorized(
        self, ref: Reference, base: str, path: str, accept: str
    ) -> Iterator[httpx.Response]:
        url = f"{base}/v2/{ref.repository}/{path}"
        scope = f"repository:{ref.repository}:pull"
        headers = {"Accept": accept}
        token = self._tokens.get((base, scope))
        if token:
            headers["Authorization"] = token
        for attempt in range(2):
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    if response.status_code == 401 and attempt == 0:
                        challenge = response.headers.get("www-authenticate", "")
                        headers["Authorization"] = self._answer(ref, base, scope, challenge)
                        self._tokens[(base, scope)] = headers["Authorization"]
                        continue
                    _raise_for(response, ref, path)
                    yield response
                    return
            except httpx.TransportError as exc:
                raise Unreachable(f"cannot reach the registry at {base}: {_reason(exc)}") from None
        raise AssertionError("unreachable")

    def _answer(self, ref: Reference, base: str, scope: str, challenge: str) -> str:
        """The Authorization header that answers a 401's challenge."""
        scheme, _, params = challenge.partition(" ")
        credentials = self._credentials(ref, base)
        if scheme.lower() == "basic":
            if credentials is None:
                raise PullError(f"{ref}: the registry wants credentials and none are configured "
                                f"for {ref.registry} (docker config auths or "
                                "FLEETCTL_REGISTRY_AUTH)")  # fmt: skip
            return "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        if scheme.lower() != "bearer":
            raise PullError(f"{ref}: the registry asks for {scheme or 'an unknown'} "
                            "authentication, which fleetctl does not speak")  # fmt: skip
        fields = dict(_CHALLENGE.findall(params))
        realm = fields.get("realm")
        if not realm:
            raise PullError(f"{ref}: the registry's Bearer challenge names no realm")
        query = {"scope": fields.get("scope", scope)}
        if "service" in fields:
            query["service"] = fields["service"]
        auth = httpx.BasicAuth(*credentials) if credentials else None
        try:
            response = self._client.get(realm, params=query, auth=auth)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the token service {realm}: {_reason(exc)}") from None
        if response.status_code in (401, 403):
            raise PullError(
                f"{ref}: unauthorized: the token service refused "
                f"{'the configured credentials' if auth else 'an anonymous pull'}"
            )
        if response.status_code != 200:
            raise PullError(f"{ref}: the token service answered HTTP {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise PullError(f"{ref}: the token service answered no token")
        return f"Bearer {token}"

    def _credentials(self, ref: Reference, base: str) -> tuple[str, str] | None:
        if base.startswith("http://") and ref.api_host not in self.settings.insecure:
            return None  # never over plain HTTP unless the operator said so
        return self.settings.credentials.get(ref.registry)


def _raise_for(response: httpx.Response, ref: Reference, path: str) -> None:
    if response.status_code == 200:
        return
    response.read()
    what = "manifest" if path.startswith("manifests/") else "blob"
    detail = _registry_error(response)
    if response.status_code == 404:
        raise PullError(f"{ref}: not found ({what} {path.split('/', 1)[1]}){detail}")
    if response.status_code in (401, 403):
        raise PullError(f"{ref}: unauthorized ({what}){detail}")
    if response.status_code == 429:
        raise PullError(f"{ref}: the registry is rate limiting pulls (HTTP 429){detail}")
    raise PullError(f"{ref}: the registry answered HTTP {response.status_code} for its {what}"
                    f"{detail}")  # fmt: skip


def _registry_error(response: httpx.Response) -> str:
    """The first of the registry's {errors: [{code, message}]}, as ': CODE message'."""
    try:
        first = response.json()["errors"][0]
        return f": {first.get('code', '')} {first.get('message', '')}".rstrip()
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return ""


def _read_bounded(response: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_bytes(CHUNK):
        data += chunk
        if len(data) > limit:
            raise PullError(f"the {what} is over {limit} bytes")
    return bytes(data)


def _declared_type(data: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(data).get("mediaType", ""))
    return ""


def _reason(exc: httpx.TransportError) -> str:
    return str(exc) or type(exc).__name__

"""What to fetch and how: a parsed source (path, file://, http(s)://, s3://, hf://), the credentials
for it, and the retry and timeout settings; `FetchRequest` bundles them for the scheme's fetcher."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

from llama_core.errors import ConfigError
from llama_core.fetch.redact import redact

HF_SYNTAX = "hf://[datasets/|spaces/]ORG/REPO[@REVISION][/FILE][?include=GLOB,GLOB&exclude=GLOB]"


@dataclass(frozen=True)
class Credentials:
    """Credentials and endpoint passed in explicitly; a field left None falls back to the environment.

    S3 uses `key`/`secret`/`session_token`/`endpoint_url`/`region` (else AWS_* variables and the
    usual boto config); hf:// uses `token` (else HF_TOKEN) and `endpoint_url` (else HF_ENDPOINT);
    http(s):// sends `token` as a bearer token, and user:password in the URL as basic auth.
    Secret fields are left out of repr() so a logged Credentials shows none of them.
    """

    key: str | None = field(default=None, repr=False)
    secret: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None
    region: str | None = None

    def secrets(self) -> tuple[str | None, ...]:
        """Every secret value in play (explicit or from the environment), for `redact`."""
        env = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HTTP_TOKEN")
        return (self.key, self.secret, self.session_token, self.token, *(os.environ.get(v) for v in env))


@dataclass(frozen=True)
class Source:
    """A parsed source. `url` keeps any credentials in it; `redacted` is what may be shown."""

    scheme: str  # "file", "http", "s3" or "hf"
    url: str
    redacted: str
    name: str  # the entry created under dest: a file name, or a folder for s3 prefixes, dirs and hf
    path: str = ""  # file: local path; s3: "bucket/key"
    repo_id: str = ""
    repo_type: str = "model"
    revision: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection, and for data on an open one."""

    connect: float = 10.0
    read: float = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` consecutive failures without progress are tolerated; waits double from `backoff`."""

    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0


@dataclass(frozen=True)
class FetchRequest:
    """One `fetch` call, as the fetcher of its source's scheme receives it."""

    src: Source
    creds: Credentials
    sha256: str | None  # the pinned digest (lower case) of a single-file source
    retry: RetryPolicy
    timeouts: Timeouts
    progress_interval: float
    # the folders a local source must resolve inside, checked on each file as it is opened; None: any
    local_roots: tuple[str, ...] | None = None
    # the hosts an http(s) source and its redirects may name (llama_core.confine); empty: any
    allowed_hosts: tuple[str, ...] = ()

    @property
    def identity(self) -> str:
        """What makes two sources the same: a path and its file:// URL are; tokens never count; one
        bucket name on two endpoints (OBS, MinIO) is not."""
        if self.src.scheme == "file":
            return str(Path(self.src.path).resolve())
        endpoint = self.creds.endpoint_url
        return f"{self.src.redacted} {endpoint}" if endpoint else self.src.redacted


def parse_source(url: str) -> Source:
    """Parse `url`; raise ConfigError naming the (redacted) source when it cannot be fetched."""
    shown = redact(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        path = unquote(parts.path) if scheme == "file" else url
        name = Path(path.rstrip("/")).name
        return Source("file", url, shown, _checked_name(name, shown), path=path)
    if scheme in ("http", "https"):
        name = unquote(PurePosixPath(parts.path).name)
        return Source("http", url, shown, _checked_name(name, shown))
    if scheme == "s3":
        key = parts.path.lstrip("/")
        if not parts.netloc:
            raise ConfigError(f"s3 source {shown} names no bucket (expected s3://BUCKET/KEY)")
        name = PurePosixPath(key.rstrip("/")).name or parts.netloc
        return Source("s3", url, shown, _checked_name(name, shown), path=f"{parts.netloc}/{key}")
    if scheme == "hf":
        return _parse_hf(url, shown)
    raise ConfigError(
        f"unsupported source scheme {scheme!r} in {shown} (use a path, file://, http(s)://, s3:// or hf://)"
    )


def _checked_name(name: str, shown: str) -> str:
    if not name or name in (".", ".."):
        raise ConfigError(f"cannot name the fetched file from {shown}: the path has no last component")
    return name


def _parse_hf(url: str, shown: str) -> Source:
    parts = urlsplit(url)
    segments = [s for s in (parts.netloc + parts.path).split("/") if s]
    repo_type = "model"
    if segments and segments[0] in ("datasets", "spaces"):
        repo_type = segments.pop(0)[:-1]
    if len(segments) < 2:
        raise ConfigError(f"hf source {shown} names no repository; expected {HF_SYNTAX}")
    owner = segments[0]
    repo, at, revision = segments[1].partition("@")
    if not repo or (at and not revision):
        raise ConfigError(f"hf source {shown} is malformed; expected {HF_SYNTAX}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"include", "exclude"}
    if unknown:
        raise ConfigError(f"hf source {shown} has unknown option(s) {sorted(unknown)}; expected {HF_SYNTAX}")
    include = [p for v in query.get("include", []) for p in v.split(",") if p]
    exclude = [p for v in query.get("exclude", []) for p in v.split(",") if p]
    if len(segments) > 2:  # a file path inside the repo is one more include pattern
        include.append("/".join(segments[2:]))
    return Source(
        "hf",
        url,
        shown,
        repo,
        repo_id=f"{owner}/{repo}",
        repo_type=repo_type,
        revision=unquote(revision) or None,
        include=tuple(include),
        exclude=tuple(exclude),
    )

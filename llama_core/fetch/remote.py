"""Readers for each store: list what a source holds, and stream a file from a byte offset.

Every reader answers the same two questions, so the download loop in `core` (resume, retry,
hash, atomic rename) is written once for every scheme `core.FETCHERS` streams:
- `listing()`: the files a source holds, each with its size and a validator (ETag,
  Last-Modified, or size+mtime for local files) that proves "same content" on a later run;
- `open(file, offset)`: a `Stream` of chunks starting at `offset` — or at 0 when the store
  cannot resume (a server that ignores Range, an object that changed since the partial began).

Failures worth retrying raise `Transient`; the rest raise `FetchError`. Both carry redacted text.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin

from llama_core.confine import SOURCE_ROOTS_ENV, check_host, confined, open_confined
from llama_core.errors import ConfigError, LlamaCoreError
from llama_core.fetch.redact import redact
from llama_core.fetch.source import FetchRequest

CHUNK = 1 << 20  # 1 MiB: large enough for full loopback speed, small enough to keep memory flat


log = logging.getLogger("llama_core.fetch")


class FetchError(LlamaCoreError):
    """A source that cannot be fetched: not found, refused, retries exhausted, or a bad digest.

    `retryable` is set when the retries were used up on transient failures (the network may recover).
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Transient(Exception):
    """A failure worth retrying (connection reset, timeout, 5xx). `retry_after` is the server's hint."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source. `rel` is its path under the entry ("" when the entry is this file)."""

    rel: str
    source: str  # redacted address, for messages and results
    size: int | None
    validator: str | None
    address: str  # what the reader needs to open it (may hold credentials: never shown)


@dataclass
class Stream:
    """Bytes of a file from `start`; `size` and `validator` as the store reported them now."""

    start: int
    size: int | None
    validator: str | None
    chunks: Iterator[bytes]


class Reader(Protocol):
    def listing(self) -> list[RemoteFile]: ...

    def open(self, file: RemoteFile, offset: int) -> Stream: ...


class LocalReader:
    """A local file or folder (copied, so a later change of the source does not reach the copy). With
    the request's `local_roots`, the source and each file opened must resolve inside them."""

    def __init__(self, req: FetchRequest) -> None:
        self.src, self.root, self.roots = req.src, Path(req.src.path), req.local_roots

    def listing(self) -> list[RemoteFile]:
        if self.roots is not None:
            confined(self.src.path, self.roots, SOURCE_ROOTS_ENV)
        if self.root.is_file():
            return [self._file(self.root, "")]
        if self.root.is_dir():
            paths = sorted(p for p in self.root.rglob("*") if p.is_file())
            return [self._file(p, p.relative_to(self.root).as_posix()) for p in paths]
        raise FetchError(f"source not found: {self.src.redacted}")

    def _file(self, path: Path, rel: str) -> RemoteFile:
        st = path.stat()
        shown = f"{self.src.redacted.rstrip('/')}/{rel}" if rel else self.src.redacted
        return RemoteFile(rel, shown, st.st_size, f"{st.st_size}:{st.st_mtime_ns}", str(path))

    def open(self, file: RemoteFile, offset: int) -> Stream:
        try:  # closed by the generator
            f = (
                open(file.address, "rb")  # noqa: SIM115
                if self.roots is None
                else open_confined(file.address, self.roots)
            )
        except FileNotFoundError:
            raise FetchError(f"source not found: {file.source}") from None
        f.seek(offset)
        return Stream(offset, file.size, file.validator, _file_chunks(f))


def _file_chunks(f) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk


_RETRY_STATUS = {408, 429}  # 4xx that mean "later", not "never": retried like 5xx
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class HttpReader:
    """http(s):// with requests: streamed GETs, Range + If-Range to resume, no content decoding.

    requests/urllib3 retry a request that fails to start, but not a body cut off half-way; the
    resume loop in `core` handles both, so urllib3's own retries are left off here.
    """

    def __init__(self, req: FetchRequest) -> None:
        import requests

        _redact_urllib3_logs()
        self.src, self.timeout = req.src, (req.timeouts.connect, req.timeouts.read)
        self.hosts = req.allowed_hosts
        check_host(self.src.url, self.hosts)
        self.session = requests.Session()
        if self.hosts:  # a response hook sees each redirect before requests follows it
            self.session.hooks["response"].append(self._check_redirect)
        # "identity": Range offsets count the stored bytes, and we keep exactly those bytes.
        self.session.headers["Accept-Encoding"] = "identity"
        if req.creds.token:
            self.session.headers["Authorization"] = f"Bearer {req.creds.token}"

    def _request(self, method: str, headers: dict[str, str]):
        import requests

        try:
            resp = self.session.request(
                method, self.src.url, headers=headers, stream=True, timeout=self.timeout, allow_redirects=True
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Transient(redact(f"{type(exc).__name__} on {method} {self.src.redacted}: {exc}")) from None
        except requests.RequestException as exc:
            raise FetchError(redact(f"{method} {self.src.redacted} failed: {exc}")) from None
        if resp.status_code >= 500 or resp.status_code in _RETRY_STATUS:
            resp.close()
            raise Transient(
                f"HTTP {resp.status_code} {resp.reason} from {self.src.redacted}", _retry_after(resp.headers)
            )
        return resp

    def _check_redirect(self, resp, **_kwargs) -> None:
        if resp.is_redirect:
            try:
                check_host(urljoin(resp.url, resp.headers["Location"]), self.hosts)
            except ConfigError as exc:
                resp.close()
                raise ConfigError(f"{self.src.redacted} redirects to another host: {exc}") from None

    def _fail(self, resp, method: str) -> FetchError:
        resp.close()
        return FetchError(f"HTTP {resp.status_code} {resp.reason} for {method} {self.src.redacted}")

    def listing(self) -> list[RemoteFile]:
        resp = self._request("HEAD", {})
        resp.close()
        if resp.status_code in (403, 405, 501):
            # Presigned GET URLs refuse HEAD: size and validator are learnt from the GET instead.
            return [RemoteFile("", self.src.redacted, None, None, self.src.url)]
        if resp.status_code >= 400:
            raise self._fail(resp, "HEAD")
        size = resp.headers.get("Content-Length")
        return [RemoteFile("", self.src.redacted, _int(size), _validator(resp.headers), self.src.url)]

    def open(self, file: RemoteFile, offset: int) -> Stream:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if file.validator and not file.validator.startswith("W/"):
                headers["If-Range"] = file.validator  # changed since the partial began -> 200, full body
        resp = self._request("GET", headers)
        status, h = resp.status_code, resp.headers
        if status == 416 and offset and _content_range_total(h) == offset:
            resp.close()  # the partial already holds every byte
            return Stream(offset, offset, file.validator, iter(()))
        m = _CONTENT_RANGE.fullmatch(h.get("Content-Range", "").strip()) if status == 206 else None
        if m and int(m[1]) == offset and (file.size is None or m[3] in ("*", str(file.size))):
            size = int(m[3]) if m[3] != "*" else file.size
            return Stream(offset, size, _validator(h) or file.validator, _http_chunks(resp, file.source))
        if status in (200, 206, 416):
            if status != 200:
                # 416: the partial is longer than the file now is; 206 for another range or total
                # size: the file changed. Either way the partial is useless: start again.
                log.info("%s: HTTP %d (%s) for bytes=%d-: fetching the whole file", file.source, status,
                         h.get("Content-Range"), offset)  # fmt: skip
                resp.close()
                resp = self._request("GET", {})
                if resp.status_code != 200:
                    raise self._fail(resp, "GET")
            size = _int(resp.headers.get("Content-Length"))
            return Stream(0, size, _validator(resp.headers), _http_chunks(resp, file.source))
        raise self._fail(resp, "GET")


def _http_chunks(resp, shown: str) -> Iterator[bytes]:
    import requests
    import urllib3.exceptions

    try:
        yield from resp.raw.stream(CHUNK, decode_content=False)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise Transient(redact(f"transfer of {shown} broke off: {type(exc).__name__}: {exc}")) from None
    finally:
        resp.close()


def _validator(headers) -> str | None:
    return headers.get("ETag") or headers.get("Last-Modified")


def _content_range_total(headers) -> int | None:
    m = re.fullmatch(r"bytes \*/(\d+)", headers.get("Content-Range", "").strip())
    return int(m[1]) if m else None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def _redact_urllib3_logs() -> None:
    """urllib3 logs each request line (with its query string) at DEBUG: mask secrets there too."""
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _RedactingFilter) for f in logger.filters):
        logger.addFilter(_RedactingFilter())


class S3Reader:
    """s3:// through s3fs (so OBS/MinIO work via `endpoint_url`); ranged reads checked by ETag."""

    def __init__(self, req: FetchRequest) -> None:
        import s3fs

        self.src, creds, timeouts = req.src, req.creds, req.timeouts
        endpoint = (
            creds.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.fs = s3fs.S3FileSystem(
            key=creds.key,
            secret=creds.secret,
            token=creds.session_token,
            endpoint_url=endpoint,
            client_kwargs={"region_name": creds.region} if creds.region else None,
            config_kwargs={"connect_timeout": timeouts.connect, "read_timeout": timeouts.read},
            skip_instance_cache=True,  # never share a client (and its credentials) between fetches
        )

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, PermissionError) as exc:
            raise FetchError(redact(f"{what} {self.src.redacted}: {type(exc).__name__}: {exc}")) from None
        except Exception as exc:  # botocore/aiohttp errors have no common base worth naming
            if _is_permanent(exc):
                raise FetchError(redact(f"{what} {self.src.redacted}: {type(exc).__name__}: {exc}")) from None
            raise Transient(redact(f"{what} {self.src.redacted}: {type(exc).__name__}: {exc}")) from None

    def listing(self) -> list[RemoteFile]:
        path = self.src.path
        if not path.endswith("/"):
            info = self._call("cannot read", self.fs.info, path)
            if info.get("type") != "directory":
                return [RemoteFile("", self.src.redacted, info["size"], info.get("ETag"), path)]
        found = self._call("cannot list", self.fs.find, path.rstrip("/"), detail=True)
        if not found:
            raise FetchError(f"nothing found under {self.src.redacted}")
        prefix = path.rstrip("/") + "/"
        base = self.src.redacted.rstrip("/")
        return [
            RemoteFile(k[len(prefix) :], f"{base}/{k[len(prefix) :]}", v["size"], v.get("ETag"), k)
            for k, v in sorted(found.items())
        ]

    def open(self, file: RemoteFile, offset: int) -> Stream:
        f = self._call("cannot open", self.fs.open, file.address, "rb", block_size=CHUNK, cache_type="none")
        etag = f.details.get("ETag")
        if file.validator and etag != file.validator:
            offset = 0  # the object changed since the partial began
        f.seek(offset)
        return Stream(offset, f.size, etag, self._chunks(f, file.source))

    def _chunks(self, f, shown: str) -> Iterator[bytes]:
        with f:
            while chunk := self._call(f"reading {shown} broke off:", f.read, CHUNK):
                yield chunk


def _is_permanent(exc: Exception) -> bool:
    """A botocore ClientError with a 4xx status (other than 408/429) will not get better by retrying."""
    status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return isinstance(status, int) and 400 <= status < 500 and status not in _RETRY_STATUS

"""Where a DAG run's params may point: the folders local sources and training configs must resolve
inside, and the config keys an override may only set to a plain name.

Anyone who may trigger a run may set its params, so a param is never trusted to name a file: a local
source must resolve (symlinks and `..` first) inside `LLAMA_LORA_SOURCE_ROOTS` and a config inside
`LLAMA_LORA_CONFIG_ROOTS` (each colon-separated), and be a regular file or a folder. Pipeline files,
like DAG files, stay trusted. `open_confined` repeats the check on the file actually opened, so a
symlink swapped after validate does not escape either. An http(s) source may name only the hosts of
`LLAMA_LORA_SOURCE_HOSTS` when it is set (comma-separated), its redirects too: a trigger cannot make a
worker read an internal service (a cloud metadata address, an admin API) into the run folder, from
where a stage's error message would quote it. No Airflow, no MindSpore.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from llama_core.errors import ConfigError

SOURCE_ROOTS_ENV = "LLAMA_LORA_SOURCE_ROOTS"
SOURCE_HOSTS_ENV = "LLAMA_LORA_SOURCE_HOSTS"
CONFIG_ROOTS_ENV = "LLAMA_LORA_CONFIG_ROOTS"
PIPELINES_ENV = "LLAMA_LORA_PIPELINES"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs (and pipelines)

# Config keys the trainer and MindFormers turn into file names or paths: output_dir, dataset_dir,
# src_strategy_path_or_dir, checkpoint_name_or_path, vocab_file, save_file, the checkpoint prefix.
PATH_KEY = re.compile(r"(?:_dir|_path|_file|prefix)\Z|\Aload_checkpoint\Z")
# a name that stays where it is put: no separator, no leading dot (`..`, hidden files: a checkpoint
# prefix with a leading dot is not found again on resume), no NUL
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


def _env_roots(name: str) -> tuple[str, ...]:
    return tuple(part for part in os.environ.get(name, "").split(":") if part)


def source_roots(work_root: str | os.PathLike[str]) -> tuple[str, ...]:
    """The folders a local source must resolve inside: `LLAMA_LORA_SOURCE_ROOTS`, else the work root."""
    return tuple(os.path.realpath(root) for root in _env_roots(SOURCE_ROOTS_ENV) or (os.fspath(work_root),))


def source_hosts() -> tuple[str, ...]:
    """The hosts an http(s) source may name: `LLAMA_LORA_SOURCE_HOSTS`, comma-separated `host`,
    `host:port`, `*.domain` or `[ipv6]:port` (a host without a port: any port); empty: any host.
    A malformed entry raises ConfigError naming the variable."""
    hosts = tuple(
        part.strip().lower() for part in os.environ.get(SOURCE_HOSTS_ENV, "").split(",") if part.strip()
    )
    for pattern in hosts:
        _pattern_parts(pattern)
    return hosts


def _pattern_parts(pattern: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{pattern}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname or port == -1 or parts.netloc != pattern or "@" in pattern:
        raise ConfigError(f"{SOURCE_HOSTS_ENV}: {pattern!r} is not a host, host:port or *.domain")
    return parts.hostname, port


def check_host(url: str, hosts: Sequence[str]) -> None:
    """An http(s) `url` must name one of `hosts` (see `source_hosts`; none: any host). The message names
    the host and port only: the rest of the URL may hold a token."""
    if not hosts:
        return
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    # urlsplit and urllib3 disagree on some authorities ("a\\@b": urlsplit reads host b, urllib3 a):
    # only a plain one is checked, so the host checked is the host requested
    hostport = parts.netloc.rpartition("@")[2]
    if not host or "\\" in parts.netloc or "%" in hostport or any(c.isspace() for c in parts.netloc):
        raise ConfigError("the URL's host is not a plain host name or address")
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        raise ConfigError("the URL's port is not a number") from None
    for pattern in hosts:
        allowed, allowed_port = _pattern_parts(pattern)
        if allowed_port not in (None, port):
            continue
        if host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:])):
            return
    shown = f"[{host}]" if ":" in host else host
    raise ConfigError(
        f"host {shown}:{port} is not among the allowed source hosts {','.join(hosts)} "
        f"(set {SOURCE_HOSTS_ENV} on the workers to allow another host)"
    )


def config_roots(*trusted: str | os.PathLike[str]) -> tuple[str, ...]:
    """Where a training config must resolve: `LLAMA_LORA_CONFIG_ROOTS`, else the repository's configs/
    and the pipelines folder (`LLAMA_LORA_PIPELINES`); plus `trusted` (the config a pipeline file names)."""
    roots = _env_roots(CONFIG_ROOTS_ENV) or (str(CONFIGS), *_env_roots(PIPELINES_ENV))
    return tuple(os.path.realpath(root) for root in (*roots, *trusted))


def within(resolved: str, roots: Sequence[str]) -> bool:
    """Whether the resolved path `resolved` is one of `roots` (resolved too) or beneath one."""
    return any(os.path.commonpath([real, resolved]) == real for real in map(os.path.realpath, roots))


def _no_nul(path: str) -> str:
    """`path`, which must hold no NUL byte (the OS would refuse it with a ValueError, not a message)."""
    if "\0" in path:
        raise ConfigError(f"{path!r} contains a NUL byte")
    return path


def confined(path: str, roots: Sequence[str], env: str, folder_ok: bool = True) -> str:
    """`path` resolved (symlinks and `..` first); it must lie inside one of `roots` and be a regular file
    (or a folder, when `folder_ok`): not a device such as /dev/zero, a FIFO or a socket. Nothing of the
    file is read, so no message can quote it."""
    resolved = os.path.realpath(_no_nul(path))
    if not within(resolved, roots):
        raise ConfigError(
            f"{path} resolves to {resolved}, outside the allowed roots {':'.join(roots)} "
            f"(set {env} on the workers to allow another folder)"
        )
    try:
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from None
    if not (stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode))):
        raise ConfigError(f"{path} is not a regular file{' or a folder' if folder_ok else ''}")
    return resolved


def open_confined(path: str, roots: Sequence[str]) -> BinaryIO:
    """`path` opened for reading, once the opened file itself is known to be a regular file inside one
    of `roots` (its path read back from the open descriptor): a symlink swapped between a check and
    the open cannot point the read elsewhere."""
    # O_NONBLOCK: opening a FIFO would wait for a writer; it is refused below instead
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path} is not a regular file")
        opened = _opened_path(fd, path, st)
        if not within(opened, roots):
            raise ConfigError(f"{path} resolves to {opened}, outside the allowed roots {':'.join(roots)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int, path: str, st: os.stat_result) -> str:
    """The path of the file open at `fd`: /proc's link on Linux; elsewhere `path` resolved now, which
    must still be that very file."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        resolved = os.path.realpath(path)
        now = os.stat(resolved)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise ConfigError(f"{path} changed while it was opened") from None
        return resolved


def check_path_overrides(overrides: Mapping[str, Any]) -> None:
    """Each override that becomes a file name or a path (`PATH_KEY`: `callbacks.1.prefix`, `output_dir`,
    `load_checkpoint`, ...; nested in an override's mapping or list too) must be a plain name that
    stays inside the run folder; the first that is not raises ConfigError naming its key."""
    for key, value in overrides.items():
        for path, leaf in _leaves(str(key), value):
            if not isinstance(leaf, str) or not PLAIN_NAME.match(leaf) or ".." in leaf:
                raise ConfigError(
                    f"config key {path!r} becomes a file name: it must be a plain name (letters, digits, "
                    f"'_', '-', '.'; no '/', no '..', not starting with '.'), got {leaf!r}"
                )


def _leaves(path: str, value: Any) -> Iterator[tuple[str, Any]]:
    """The path-like keys under `path` set by `value`, with their values."""
    if PATH_KEY.search(path.rpartition(".")[2]):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(f"{path}.{key}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(f"{path}.{index}", item)

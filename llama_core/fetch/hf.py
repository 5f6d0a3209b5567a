"""hf:// sources through huggingface_hub.snapshot_download (its own resume, retries and cache).

A tokenizer source `hf://ORG/REPO` names a whole repo; `tokenizer_source` narrows it to the
tokenizer's files (TOKENIZER_FILES, those the repo has), fetched into one folder that
`llama_core.data.tokenizer.open_tokenizer` reads.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

from tqdm import tqdm

from llama_core.cache import file_sha256
from llama_core.data.tokenizer import HF_FILES
from llama_core.fetch.remote import FetchError
from llama_core.fetch.results import FetchedFile
from llama_core.fetch.source import FetchRequest, parse_source

# What makes a tokenizer in an HF repo: an HF tokenizer folder's files, or a tokenizer.model
# (sentencepiece, or Llama 3's tiktoken file)
TOKENIZER_FILES = (*HF_FILES, "tokenizer.model")


def tokenizer_source(url: str) -> str:
    """`url` as a tokenizer source: an hf:// repo that names no file and no include patterns gets
    `include=` TOKENIZER_FILES (not the repo's weights); any other source is returned as it is."""
    if not url.lower().startswith("hf://"):
        return url
    src = parse_source(url)
    if src.include:
        return url
    return f"{url}{'&' if '?' in url else '?'}include={','.join(TOKENIZER_FILES)}"


def fetch_hf(req: FetchRequest, store: Path) -> list[FetchedFile]:
    """Download the matching files of the request's repo into the folder `store/<repo>`; one
    FetchedFile each.

    huggingface_hub resumes, retries and reports progress itself, so `req.retry` and
    `req.progress_interval` do not apply. It keeps per-file metadata in `.cache/huggingface` under
    that folder and skips files whose hub ETag is unchanged; a file counts as `cached` when the
    call left it untouched.
    """
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    src, creds, local = req.src, req.creds, store / req.src.name
    before = _identities(local)
    try:
        huggingface_hub.snapshot_download(
            src.repo_id,
            repo_type=src.repo_type,
            revision=src.revision,
            local_dir=local,
            allow_patterns=list(src.include) or None,
            ignore_patterns=list(src.exclude) or None,
            token=creds.token or None,  # None: huggingface_hub reads HF_TOKEN itself
            endpoint=creds.endpoint_url,
            etag_timeout=req.timeouts.connect,
            tqdm_class=LoggedTqdm,
        )
    except (huggingface_hub.errors.HfHubHTTPError, huggingface_hub.errors.LocalEntryNotFoundError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None) or 0
        raise FetchError(  # a 4xx (no such repo, no access) stays; a dropped connection or 5xx may pass
            f"hf download of {src.redacted} failed: {type(exc).__name__}: {exc}",
            retryable=not 400 <= status < 500,
        ) from None
    after = _identities(local)
    # Only the files the patterns select: others may be left from a fetch with other patterns.
    rels = sorted(
        filter_repo_objects(
            after, allow_patterns=list(src.include) or None, ignore_patterns=list(src.exclude) or None
        )
    )
    if not rels:
        raise FetchError(f"hf source {src.redacted} matched no files")
    rev = f"@{src.revision}" if src.revision else ""
    base = f"hf://{'' if src.repo_type == 'model' else src.repo_type + 's/'}{src.repo_id}{rev}"
    return [
        FetchedFile(
            f"{base}/{rel}",
            local / rel,
            after[rel][0],
            file_sha256(local / rel),
            before.get(rel) == after[rel],
        )
        for rel in rels
    ]


_BAR_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LogLines(io.TextIOBase):
    """A text stream that turns each tqdm refresh into one log line."""

    def write(self, text: str) -> int:
        line = text.strip("\r\n ")
        if line:
            logging.getLogger("llama_core.fetch").info("%s", line)
        return len(text)


class LoggedTqdm(tqdm):
    """huggingface_hub's progress bars as log lines, at most one per bar every 5 s.

    A terminal bar redrawn every 0.1 s becomes thousands of lines in an Airflow task log; this
    real tqdm (so every method the hub calls exists) prints to the log, rate-limited, no bar graphic.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("name", None)  # an HF-only argument
        kwargs.update(
            file=_LogLines(),
            mininterval=5.0,
            disable=False,
            bar_format=_BAR_FORMAT,
        )
        super().__init__(*args, **kwargs)


def _identities(folder: Path) -> dict[str, tuple[int, int, int]]:
    """{relative path: (size, mtime_ns, inode)} of the files under `folder`, minus hub metadata."""
    out = {}
    for root, dirs, files in os.walk(folder):
        if Path(root) == folder and ".cache" in dirs:
            dirs.remove(".cache")
        for name in files:
            st = (Path(root) / name).stat()
            out[(Path(root) / name).relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out

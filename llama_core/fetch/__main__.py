"""CLI: python -m llama_core.fetch URL --dest DIR [--sha256 HEX] [--cache DIR].

Prints the result as JSON on stdout (files with size, sha256, cached). Credentials come from the
environment only (AWS_*, HF_TOKEN, HTTP_TOKEN): a secret on a command line shows in `ps`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from llama_core.cli import exit_code
from llama_core.fetch import HF_SYNTAX, Credentials, RetryPolicy, Timeouts, fetch


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llama_core.fetch",
        description="Fetch a file or folder from a path, file://, http(s)://, s3:// or hf:// into DEST, "
        f"resumably and verified. hf syntax: {HF_SYNTAX}",
    )
    p.add_argument("url", help="source; userinfo and token-like query values are never logged")
    p.add_argument("--dest", required=True, help="folder that receives the file (or folder) DEST/<name>")
    p.add_argument("--sha256", help="expected sha256 of a single-file source; a mismatch keeps nothing")
    p.add_argument("--cache", help="shared download cache folder; DEST gets hard links (or copies)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (OBS, MinIO) or HF endpoint")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--retries", type=int, default=5, help="consecutive failed attempts tolerated (default 5)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--read-timeout", type=float, default=60.0, help="seconds without data (default 60)")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    a = p.parse_args(argv)
    # HTTP_TOKEN is for http(s) only; hf:// reads HF_TOKEN through huggingface_hub.
    http_token = os.environ.get("HTTP_TOKEN") if a.url.startswith(("http://", "https://")) else None
    result = fetch(
        a.url,
        a.dest,
        sha256=a.sha256,
        cache_dir=a.cache,
        credentials=Credentials(token=http_token, endpoint_url=a.endpoint_url, region=a.region),
        retry=RetryPolicy(retries=a.retries),
        timeouts=Timeouts(a.connect_timeout, a.read_timeout),
        progress_interval=a.progress_interval,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))

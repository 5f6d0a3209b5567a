"""CLI: python -m llama_core.fetch URL --dest DIR [--sha256 HEX] [--cache DIR].

Prints the result as JSON on stdout (files with size, sha256, cached). Credentials come from the
environment only (AWS_*, HF_TOKEN, HTTP_TOKEN): a secret on a command line shows in `ps`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from llama_core.cli import exit_code
from llama_core.fetch import HF_SYNTAX, Credentials, FetchResult, RetryPolicy, Timeouts, fetch
from llama_core.results import print_result


def build_parser(prog: str = "python -m llama_core.fetch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
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
    return p


def stage_from_args(args: argparse.Namespace) -> FetchResult:
    """The fetch the parsed command line asks for."""
    # HTTP_TOKEN is for http(s) only; hf:// reads HF_TOKEN through huggingface_hub.
    http_token = os.environ.get("HTTP_TOKEN") if args.url.startswith(("http://", "https://")) else None
    return fetch(
        args.url,
        args.dest,
        sha256=args.sha256,
        cache_dir=args.cache,
        credentials=Credentials(token=http_token, endpoint_url=args.endpoint_url, region=args.region),
        retry=RetryPolicy(retries=args.retries),
        timeouts=Timeouts(args.connect_timeout, args.read_timeout),
        progress_interval=args.progress_interval,
    )


def main(argv: Sequence[str] | None = None) -> int:
    print_result(stage_from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))

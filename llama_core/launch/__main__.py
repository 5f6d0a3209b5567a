"""`python -m llama_core.launch [msrun flags] -- <llama_core.run args>`: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llama_core.cli import exit_code
from llama_core.launch.job import launch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_core.launch",
        description="Run `python -m llama_core.run ARGS` on every rank with msrun; fail fast if a rank dies.",
        usage="%(prog)s [msrun flags] -- <llama_core.run args>",
    )
    parser.add_argument("--worker_num", type=int, default=8, help="total ranks (default 8)")
    parser.add_argument("--local_worker_num", type=int, default=8, help="ranks on this node (default 8)")
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument(
        "--master_port", type=int, default=8118, help="default 8118; 0 picks a free port for this launch"
    )
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--log_dir", default="output/msrun_log")
    parser.add_argument("--join", type=lambda s: s.lower() == "true", default=False, help="passed to msrun")
    parser.add_argument("--cluster_time_out", type=int, default=7200, help="seconds (passed to msrun)")
    parser.add_argument("--devices", help="comma-separated physical NPU ids for local ranks 0..n-1")
    parser.add_argument("--quiet", action="store_true", help="don't echo rank logs to stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)

    def echo(rank: int, line: str) -> None:
        print(f"[rank {rank}] {line}", flush=True)

    result = launch(
        rest,
        worker_num=args.worker_num,
        local_worker_num=args.local_worker_num,
        master_addr=args.master_addr,
        master_port=args.master_port or None,
        node_rank=args.node_rank,
        log_dir=args.log_dir,
        join=args.join,
        cluster_time_out=args.cluster_time_out,
        devices=[int(d) for d in args.devices.split(",")] if args.devices else None,
        on_line=None if args.quiet else echo,
    )
    for r in result.ranks:
        print(f"rank {r.rank}: exit {r.exit_code}, log {r.log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_code(main))

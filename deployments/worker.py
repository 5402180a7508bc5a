"""`python -m deployments.worker --pool lora-gpu`: a Prefect process worker for this machine's GPUs.

Creates (or resizes) the worker's `gpu-<worker id>` limit, then becomes
`prefect worker start --pool POOL --name WORKER_ID --limit SUBJECTS+1` with the
machine's settings in its environment, which every flow run it starts
inherits. Run it on each GPU box with PREFECT_API_URL naming the server.
"""

from __future__ import annotations

import argparse
import os
import sys

from deployments import POOL
from deployments.machine import add_machine_options, prepare_machine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deployments.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=POOL, help=f"the process work pool to poll (default: {POOL})")
    add_machine_options(parser)
    return parser


def worker_command(args: argparse.Namespace) -> list[str]:
    """`prefect worker start` for this machine; one run slot more than the subjects, for a batch run."""
    start = ["worker", "start", "--pool", args.pool, "--type", "process", "--name", args.worker_id]
    return [sys.executable, "-m", "prefect", *start, "--limit", str(args.subjects + 1)]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    limit = prepare_machine(args)
    print(f"worker {args.worker_id}: {args.subjects} subject(s) at once, {limit} with {args.gpus} slot(s)", flush=True)
    command = worker_command(args)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()

"""This machine as a worker: its id, how many subjects it runs at once, its GPU limit.

Both ways to run the deployments (`deployments.serve`, `deployments.worker`)
take the same three settings, export them to the flow runs they start
(`tasks.gpu` reads them) and create the worker's `gpu-<worker id>` limit with
one slot per card, so a second machine is just the same command run there.
"""

from __future__ import annotations

import argparse
import os
import socket

from tasks.gpu import SUBJECTS_ENV, WORKER_ID_ENV, ensure_gpu_limit, gpu_limit_name

__all__ = ["add_machine_options", "prepare_machine"]


def add_machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-id",
        default=socket.gethostname().split(".")[0],
        help="this worker's name, unique per machine; its GPU limit is gpu-<worker id> (default: the host name)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPU jobs at once on this worker's card (default: 1); several cards in a box: one worker per card, "
        "each with its own --worker-id and CUDA_VISIBLE_DEVICES",
    )
    parser.add_argument(
        "--subjects",
        type=int,
        default=2,
        help="subjects running at once on this machine; their ingest and checks overlap, their GPU stages take "
        "turns, and each gets cores/subjects CPU threads (default: 2)",
    )


def prepare_machine(args: argparse.Namespace) -> str:
    """Check the settings, export them to the runs this process starts, create the GPU limit; its name."""
    if args.gpus < 1 or args.subjects < 1:
        raise SystemExit("error: --gpus and --subjects must be at least 1")
    gpu_limit_name(args.worker_id)  # a bad id fails here, not in the first GPU stage
    os.environ[WORKER_ID_ENV] = args.worker_id
    os.environ[SUBJECTS_ENV] = str(args.subjects)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return ensure_gpu_limit(args.worker_id, args.gpus)

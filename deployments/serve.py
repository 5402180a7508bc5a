"""`python -m deployments.serve`: the single-machine default, both deployments served from this process.

    prefect server start                                    # another terminal; the UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.serve

Serves `train-subject/local` (a form in the UI) and `train-batch/local` (the
nightly batch; its schedule off unless `--nightly`) against whatever server
`PREFECT_API_URL` names; each run starts in its own process. (The work pool's
deployments, from `prefect deploy --all`, are the `default` ones.)
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.schedules import Cron

from deployments import NIGHTLY_BATCH, NIGHTLY_CRON, SERVED
from deployments.machine import add_machine_options, prepare_machine
from flows.train_batch import train_batch
from flows.train_subject import train_subject


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve", description=__doc__.splitlines()[0])
    add_machine_options(parser)
    parser.add_argument("--nightly", action="store_true", help=f"turn the batch's schedule on (cron {NIGHTLY_CRON!r})")
    parser.add_argument("--batch-file", default=NIGHTLY_BATCH, help=f"the scheduled batch (default: {NIGHTLY_BATCH})")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    limit = prepare_machine(args)
    print(f"serving on worker {args.worker_id}: {args.subjects} subject(s) at once, {limit} with {args.gpus} slot(s)")
    subject = train_subject.to_deployment(name=SERVED, description="Train a LoRA of one subject")
    batch = train_batch.to_deployment(
        name=SERVED,
        description="Train every subject of a batch file, one train-subject run each",
        parameters={"batch_file": args.batch_file},
        schedules=[Cron(NIGHTLY_CRON, active=args.nightly)],
    )
    # One run slot more than the subjects: the batch run waits for its subjects without taking one of theirs.
    serve(subject, batch, limit=args.subjects + 1)


if __name__ == "__main__":
    main()

"""How the flows run beyond one command: deployments, work pool, workers, the nightly schedule.

- `python -m deployments.serve`: both deployments served from one process (one machine).
- `prefect deploy --all` (the root's `prefect.yaml`) and `python -m deployments.worker` on each GPU box:
  the same deployments on a process work pool, run by workers on any machine.
"""

POOL = "lora-gpu"
# The work pool's deployments (prefect.yaml) are named `default`, the served ones `local`, so the two ways
# never overwrite each other on one server; a batch starts its subjects on its own way (flows.train_batch).
SUBJECT_DEPLOYMENT = "train-subject/default"
BATCH_DEPLOYMENT = "train-batch/default"
SERVED = "local"
NIGHTLY_CRON = "0 1 * * *"  # 01:00 every night; off until turned on (docs/deployments.md: the schedule)
NIGHTLY_BATCH = "deployments/nightly.yaml"

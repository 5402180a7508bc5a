"""A main module like the command line's, for `test_phone_photos`: run as `python -m tests.unit.worker_main`,
it prints whether its check workers ran it again (as `__mp_main__`, which multiprocessing does for the main
module unless it is kept from them)."""

from __future__ import annotations

import sys


def main_ran_again(_: int) -> bool:
    """Whether this process's `__mp_main__` is this file, run again (the fork server's own is a bare `-c`)."""
    return getattr(sys.modules.get("__mp_main__"), "__file__", None) == __file__


if __name__ == "__main__":
    from lora_core.checks.workers import run_per_photo
    from tests.unit.worker_main import main_ran_again as work  # by its module's name, not __main__'s

    print(sorted({ran for _, ran in run_per_photo(work, list(range(6)), workers=2)}))

"""The terminal: other libraries' progress bars off without importing those libraries up front."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from flows import console
with console.quiet_libraries():
    console.quiet_library_bars()
    assert "diffusers" not in sys.modules and "transformers" not in sys.modules  # not imported to be quieted
    import diffusers.utils.logging as d, transformers.utils.logging as t
    print(d._tqdm_active, t._tqdm_active)
print(d._tqdm_active, t._tqdm_active)
"""


def test_library_bars_go_off_as_the_libraries_are_imported_and_back_on_after():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False", "True", "True"], done.stdout

"""The architecture's one hard rule: lora_core is a pure library, importable without Prefect."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import lora_core
from tests.conftest import ROOT


def test_lora_core_imports_no_prefect():
    modules = [f"lora_core.{m.name}" for m in pkgutil.iter_modules(lora_core.__path__)]
    assert "lora_core.ingest" in modules and "lora_core.config" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not leaked, leaked\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

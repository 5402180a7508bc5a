"""Adding a model family is one new module and its registry entry: nothing else in the project changes.

On a copy of the project, a throw-away family (SD1.5 under another name, with its own preset) is written as
`lora_core/families/toy.py` and entered in the registry; the command line then trains one tiny epoch with
it. The copy's other files are the project's own, byte for byte.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lora_core.foundation.lora_file import read_lora
from tests.conftest import DEMO_PHOTOS, ROOT, TINY_BLIP

TINY_SD15 = "builtin:tiny-sd15"
PACKAGES = ("lora_core", "tasks", "flows", "deployments")

TOY = '''"""A throw-away family for the plug-in test: SD1.5 under another name, with a preset of its own."""

from lora_core.families.sd15 import StableDiffusion1


class Toy(StableDiffusion1):
    name = "toy"
    label = "Toy SD"
    presets = {"toy": {"model_family": "toy", "max_train_epochs": 1, "network_dim": 4, "network_alpha": 2}}


FAMILY = Toy()
'''


def add_family(project: Path) -> None:
    """What a developer writes: the module, its import and its registry entry."""
    (project / "lora_core" / "families" / "toy.py").write_text(TOY)
    registry = project / "lora_core" / "families" / "__init__.py"
    imports, entry = "from lora_core.families import flux, sd15, sdxl\n", '    "flux": flux.FAMILY,\n'
    text = registry.read_text()
    assert imports in text and entry in text
    text = text.replace(imports, imports.replace("sdxl\n", "sdxl, toy\n"))
    registry.write_text(text.replace(entry, entry + '    "toy": toy.FAMILY,\n'))


def changed_files(project: Path) -> list[str]:
    """The files of the copy that are new or differ from the project's."""
    changed = []
    for package in PACKAGES:
        for path in sorted((project / package).rglob("*.py")):
            original = ROOT / path.relative_to(project)
            if not original.is_file() or not filecmp.cmp(path, original, shallow=False):
                changed.append(path.relative_to(project).as_posix())
    return changed


def test_a_new_family_is_one_module_and_one_registry_entry(tmp_path, builtin_models_home):
    project = tmp_path / "project"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    add_family(project)
    assert changed_files(project) == ["lora_core/families/__init__.py", "lora_core/families/toy.py"]

    config = tmp_path / "config.json"
    config.write_text('{"resolution": 256, "min_bucket_reso": 128, "max_bucket_reso": 512, "num_repeats": 2}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}
    env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    command = [sys.executable, "-m", "flows.train_subject", str(DEMO_PHOTOS), "--token", "t0y"]
    command += ["--workdir", str(tmp_path / "work"), "--base-model", TINY_SD15, "--caption-model", TINY_BLIP]
    command += ["--preset", "toy", "--config", str(config), "--stop-after", "train"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    result = tmp_path / "work" / "t0y" / "result_current"
    assert sorted(p.name for p in result.glob("t0y-*.safetensors")) == ["t0y-000001.safetensors"]  # the preset's 1
    lora = read_lora(result / "t0y-000001.safetensors")
    assert lora.rank == 4  # the toy preset's network_dim, so the run did resolve the new family's preset
    assert any(float(up.abs().sum()) > 0 for _, up, _ in lora.modules.values()), "nothing was learned"
    settings = [p.read_text() for p in (tmp_path / "work" / "t0y").rglob("*.json")]
    assert any('"model_family": "toy"' in text for text in settings)  # the run's exported kohya_ss settings

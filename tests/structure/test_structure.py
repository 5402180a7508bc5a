"""lora_core's folders are its layers (`lora_core.LAYERS`, bottom-up): every module lives in one, none imports
from a layer above its own, the library imports no Prefect, and only the family modules ask which family it is.

Imports are read from the source (ast), wherever they are: at the top, inside a function, under
`if TYPE_CHECKING:`, relative ones resolved.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lora_core
from tests.conftest import ROOT

PACKAGE = Path(lora_core.__file__).parent
# Top-level modules beside the layer folders: `__init__` alone today; a handful at most.
MAX_TOP_LEVEL_MODULES = 3


def layer_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())


def imported_modules(path: Path, root: Path) -> set[str]:
    """The dotted names the module at `path` imports (`from a import b` gives `a` and `a.b`), relative resolved."""
    here = [root.name, *path.relative_to(root).with_suffix("").parts][:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def upward_imports(root: Path, layers: tuple[str, ...]) -> list[str]:
    """Every import of a module in a higher layer than the importer's, as 'file (layer) imports name (layer)'."""
    rank = {name: i for i, name in enumerate(layers)}
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in rank:
            continue
        for name in sorted(imported_modules(path, root)):
            pieces = name.split(".")
            if pieces[0] == root.name and len(pieces) > 1 and rank.get(pieces[1], -1) > rank[parts[0]]:
                found.append(f"{path.relative_to(root.parent)} ({parts[0]}) imports {name} ({pieces[1]})")
    return found


def test_the_folders_are_the_layers():
    assert layer_folders(PACKAGE) == sorted(lora_core.LAYERS), "every folder is a layer in lora_core.LAYERS, and back"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= MAX_TOP_LEVEL_MODULES, f"modules outside a layer folder: {loose}"
    for layer in lora_core.LAYERS:
        assert not [p for p in (PACKAGE / layer).iterdir() if p.is_dir() and p.name != "__pycache__"], (
            f"{layer}/ has sub-folders: a layer is one level of modules"
        )


def test_no_module_imports_from_a_higher_layer():
    upward = upward_imports(PACKAGE, lora_core.LAYERS)
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_check_sees_every_kind_of_upward_import(tmp_path):
    """A copy of the real layers with upward imports planted in four forms: each one is reported."""
    root = tmp_path / "lora_core"
    root.mkdir()
    for layer in lora_core.LAYERS:
        (root / layer).mkdir()
        (root / layer / "__init__.py").write_text("")
    bottom, top = lora_core.LAYERS[0], lora_core.LAYERS[-1]
    (root / top / "high.py").write_text("X = 1\n")
    (root / bottom / "plain.py").write_text(f"import lora_core.{top}.high\n")
    (root / bottom / "typed.py").write_text(
        f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lora_core.{top}.high import X\n"
    )
    (root / bottom / "late.py").write_text(f"def f():\n    from lora_core.{top} import high\n")
    (root / bottom / "relative.py").write_text(f"from ..{top}.high import X\n")
    (root / top / "fine.py").write_text(f"from lora_core.{bottom}.plain import *\n")
    reported = "\n".join(upward_imports(root, lora_core.LAYERS))
    for name in ("plain", "typed", "late", "relative"):
        assert f"{bottom}/{name}.py" in reported
    assert "fine.py" not in reported


def test_lora_core_imports_no_prefect():
    modules = sorted(
        ".".join(("lora_core", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    )
    assert "lora_core.dataset.ingest" in modules and "lora_core.config.lora_config" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not leaked, leaked\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


# --- Only a family module asks which family it is --------------------------------------------------------------

# Where the family may be named: the family modules; the config import that maps kohya's/CivitAI's
# `sdxl`/`v2` keys to a family; and the builders of the offline tiny models, which are data (a folder like a
# hub's), not a question any code asks.
FAMILY_ALLOWED = ("lora_core/families/", "lora_core/config/kohya.py", "lora_core/foundation/tiny_models.py")
FAMILY_WORD = re.compile(r"sdxl|(^|_)v2($|_)|sd_?15|(^|_)sd_?v?[12]($|_)", re.IGNORECASE)


def family_questions(path: Path) -> list[str]:
    """Identifiers that name a family (`sdxl`, `is_sdxl`, `v2`, `SDXLConditioning`) and strings that compare
    against one (`== "sdxl"`, `in ("sd15", "sdxl")`), as 'line: what'."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.keyword | ast.arg) and node.arg:
            names = [node.arg]
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Compare):
            leaves = [leaf for side in [node.left, *node.comparators] for leaf in ast.walk(side)]
            found += [
                f"{node.lineno}: compares with {leaf.value!r}"
                for leaf in leaves
                if isinstance(leaf, ast.Constant) and isinstance(leaf.value, str) and FAMILY_WORD.search(leaf.value)
            ]
        found += [f"{node.lineno}: {name}" for name in names if FAMILY_WORD.search(name)]
    return found


def test_no_code_outside_the_families_asks_which_family_it_is():
    asking = []
    for folder in ("lora_core", "tasks", "flows", "deployments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            where = path.relative_to(ROOT).as_posix()
            if where.startswith(FAMILY_ALLOWED):
                continue
            asking += [f"{where}:{line}" for line in family_questions(path)]
    assert not asking, "code outside lora_core/families/ asks which family it is:\n" + "\n".join(asking)


@pytest.mark.parametrize(
    "source",
    [
        "if base.sdxl:\n    pass\n",
        "def load(spec, sdxl=None):\n    pass\n",
        "load(spec, v2=True)\n",
        "x = family.name == 'sdxl'\n",
        "x = name in ('sd15', 'other')\n",
        "class SDXLThing:\n    pass\n",
    ],
)
def test_the_family_check_sees_each_way_of_asking(tmp_path, source):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert family_questions(path)


def test_the_registry_names_each_family_by_its_own_name_and_presets_do_not_collide():
    from lora_core.families import FAMILIES, PRESETS

    assert all(key == family.name for key, family in FAMILIES.items())
    presets = [name for family in FAMILIES.values() for name in family.presets]
    assert len(presets) == len(set(presets)) == len(PRESETS)
    assert all(values.get("model_family") == f.name for f in FAMILIES.values() for values in f.presets.values())

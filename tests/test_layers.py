"""lora_core's layers (`lora_core.LAYERS`): every module is placed, and none imports from a layer above its own.

Imports are read from the source (ast), wherever they are: at the top, inside
a function, under `if TYPE_CHECKING:`. A package such as `lora_core/checks/` is
one entry of the table, and every module in it belongs to the package's layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lora_core

PACKAGE = Path(lora_core.__file__).parent


def entries(root: Path) -> dict[str, Path]:
    """The top-level entries of the package at `root`: each module file and each sub-package folder."""
    found = {path.stem: path for path in root.glob("*.py") if path.stem != "__init__"}
    found |= {path.name: path for path in root.iterdir() if (path / "__init__.py").is_file()}
    return found


def sources(entry: Path) -> list[Path]:
    return sorted(entry.rglob("*.py")) if entry.is_dir() else [entry]


def imported_entries(path: Path, root: Path) -> set[str]:
    """The entries of the package at `root` that the module at `path` imports, relative imports resolved."""
    package = root.name
    # Where relative imports start: a module's package, or a package's own `__init__`'s package.
    here = [package, *path.relative_to(root).with_suffix("").parts][:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from lora_core import faces`
    found = {name.split(".")[1] for name in names if name.startswith(f"{package}.")}
    return found & set(entries(root))


def layer_of() -> dict[str, int]:
    return {name: rank for rank, (_, names) in enumerate(lora_core.LAYERS) for name in names}


def test_every_module_is_in_exactly_one_layer():
    listed = [name for _, names in lora_core.LAYERS for name in names]
    twice = sorted({name for name in listed if listed.count(name) > 1})
    assert not twice, f"listed in more than one layer: {twice}"
    on_disk = set(entries(PACKAGE))
    unplaced = sorted(on_disk - set(listed))
    assert not unplaced, f"lora_core modules in no layer (add them to lora_core.LAYERS): {unplaced}"
    stale = sorted(set(listed) - on_disk)
    assert not stale, f"lora_core.LAYERS lists modules that do not exist: {stale}"


def test_no_module_imports_from_a_higher_layer():
    rank = layer_of()
    names = [name for name, _ in lora_core.LAYERS]
    upward = []
    for name, entry in sorted(entries(PACKAGE).items()):
        for path in sources(entry):
            for used in sorted(imported_entries(path, PACKAGE)):
                if used in rank and name in rank and rank[used] > rank[name]:
                    where = path.relative_to(PACKAGE.parent)
                    upward.append(f"{where} ({names[rank[name]]}) imports {used} ({names[rank[used]]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_reader_sees_every_kind_of_import(tmp_path):
    """Imports inside functions and type-only ones count, and a sub-package's relative imports resolve."""
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    for name in ("__init__.py", "a.py", "b.py", "c.py", "d.py", "e.py", "sub/__init__.py", "sub/inner.py"):
        (root / name).write_text("")
    (root / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import pkg.b\n"
        "if TYPE_CHECKING:\n    from pkg.c import C\n"
        "def f():\n    from pkg import d\n    from . import e\n"
    )
    (root / "sub" / "inner.py").write_text("from .. import b\nfrom ..c import C\nfrom . import helpers\n")
    (root / "sub" / "__init__.py").write_text("from .inner import x\nfrom ..d import y\n")
    assert imported_entries(root / "a.py", root) == {"b", "c", "d", "e"}
    assert imported_entries(root / "sub" / "inner.py", root) == {"b", "c", "sub"}
    assert imported_entries(root / "sub" / "__init__.py", root) == {"sub", "d"}
    assert set(entries(root)) == {"a", "b", "c", "d", "e", "sub"}

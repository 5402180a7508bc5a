"""Cache keys follow the code (issue 21): a stage's code version is the import closure of its entry point.

The hand-kept module lists went stale (ingest's left out ingest_swap, checks.workers and fs), so the
walker is tested on a toy package covering every way of importing, then the acceptance is checked on a
copy of the real `lora_core/`: a statement anywhere in a stage's closure re-runs the stage, a comment, a
docstring or a change elsewhere keeps it cached. The real sources are never touched.
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from types import ModuleType

import pytest
from prefect.cache_policies import CachePolicy

from tasks.caching import PROJECT_ROOT, CodeVersion, code_fingerprint, module_file, project_imports

STATEMENT = "\n_CACHE_PROBE = 1\n"
COMMENT = "\n# a cache probe: a comment changes no behaviour\n"

# Each stage's cache policy, by the module and name it is wired up as: the tests read the entry points
# from the wiring itself, so they follow the call sites wherever lora_core's modules move.
STAGES = {
    "ingest": ("tasks.ingest", "INGEST_CACHE"),
    "buckets": ("tasks.buckets", "BUCKETS_CACHE"),
    "captions": ("tasks.captions", "CAPTIONS_CACHE"),
    "train": ("tasks.train", "TRAIN_CACHE"),
}


# -- the walker, on a toy package ---------------------------------------------------------------------

TOY = {
    "app/__init__.py": '"""The toy package."""\n',
    "app/main.py": """
        '''The entry point: every way of importing, once.'''
        from __future__ import annotations

        import os
        from typing import TYPE_CHECKING

        import numpy.linalg  # third-party: not ours
        import other  # a top-level module outside `packages`

        import app.top
        from app.sub import leaf  # a submodule, from its package
        from . import rel  # relative
        from .sub.attrs import VALUE  # a name from a module: the module counts
        import app.nested.inner.mod  # runs app/nested/__init__.py and app/nested/inner/__init__.py too

        if TYPE_CHECKING:
            from app import typed  # type-only, counted all the same (conservative)

        try:
            import app.fast
        except ImportError:
            from app import fallback  # in a handler


        def late():
            import app.lazy  # inside a function: it runs when called

            return app.lazy, os, VALUE
    """,
    "app/top.py": "import app.cycle_a\n",
    "app/cycle_a.py": "from app import cycle_b\n",
    "app/cycle_b.py": "from app import cycle_a  # a cycle: the walk must end\n",
    "app/sub/__init__.py": "",
    "app/sub/leaf.py": "from .. import deep_rel  # two levels up\n",
    "app/sub/attrs.py": "VALUE = 1\n",
    "app/rel.py": "",
    "app/typed.py": "",
    "app/lazy.py": "",
    "app/fast.py": "",
    "app/fallback.py": "",
    "app/deep_rel.py": "",
    "app/nested/__init__.py": "",
    "app/nested/inner/__init__.py": "",
    "app/nested/inner/mod.py": "",
    "app/unused.py": "import app.main\n",  # imports the entry, is not imported by it
    "other.py": "import app.unused\n",
}

TOY_CLOSURE = [
    "app",
    "app.cycle_a",
    "app.cycle_b",
    "app.deep_rel",
    "app.fallback",
    "app.fast",
    "app.lazy",
    "app.main",
    "app.nested",
    "app.nested.inner",
    "app.nested.inner.mod",
    "app.rel",
    "app.sub",
    "app.sub.attrs",
    "app.sub.leaf",
    "app.top",
    "app.typed",
]


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dedent(text))
    return root


def _dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return _write_tree(tmp_path, TOY)


def test_the_walker_follows_every_kind_of_import_and_nothing_else(toy: Path) -> None:
    assert project_imports("app.main", toy, packages=("app",)) == TOY_CLOSURE


def test_a_module_outside_the_packages_is_left_out_unless_named(toy: Path) -> None:
    """`other` is imported by app.main; only when it is one of `packages` does it (and what it imports) count."""
    assert "other" not in project_imports("app.main", toy, packages=("app",))
    both = project_imports("app.main", toy, packages=("app", "other"))
    assert {"other", "app.unused"} <= set(both)


def test_a_package_entry_point_and_several_entry_points(toy: Path) -> None:
    assert project_imports("app.sub", toy, packages=("app",)) == ["app", "app.sub"]
    assert project_imports(["app.top", "app.rel"], toy, packages=("app",)) == [
        "app",
        "app.cycle_a",
        "app.cycle_b",
        "app.rel",
        "app.top",
    ]


def test_an_unknown_entry_point_is_an_error_not_an_empty_key(toy: Path) -> None:
    """An empty closure would key on nothing: the stage would never re-run for a code change."""
    with pytest.raises(ValueError, match=r"app\.missing"):
        project_imports("app.missing", toy, packages=("app",))
    with pytest.raises(ValueError, match=r"app\.missing"):
        CodeVersion("app.missing", root=toy, packages=("app",))


def test_a_package_is_found_before_a_module_of_the_same_name(tmp_path: Path) -> None:
    root = _write_tree(tmp_path, {"app/__init__.py": "", "app/x.py": "", "app/x/__init__.py": ""})
    assert module_file("app.x", root) == root / "app" / "x" / "__init__.py"
    assert module_file("app.y", root) is None


# -- the fingerprint ------------------------------------------------------------------------------------

FINGERPRINTED = {
    "app/__init__.py": "",
    "app/mod.py": '''
        """The module's docstring."""

        # a comment
        LIMIT = 3


        class Thing:
            """The class's docstring."""

            def run(self):
                """The method's docstring."""
                return LIMIT
    ''',
}


def _fingerprint_after(tmp_path: Path, edit: str, replace: tuple[str, str] | None = None) -> str:
    root = _write_tree(tmp_path, FINGERPRINTED)
    path = root / "app" / "mod.py"
    text = path.read_text()
    if replace:
        text = text.replace(*replace)
    path.write_text(text + edit)
    return code_fingerprint(["app", "app.mod"], root)


@pytest.mark.parametrize(
    ("edit", "replace"),
    [
        (COMMENT, None),
        ("", ("# a comment", "# another comment, longer")),
        ("", ('"""The module\'s docstring."""', '"""Reworded."""')),
        ("", ('"""The method\'s docstring."""', '"""Reworded,\n\n                over lines."""')),
        ("", ('        """The class\'s docstring."""\n', "")),
        ("", ("LIMIT = 3", "LIMIT = (\n    3\n)")),
        ("\n\n\n", None),
    ],
    ids=["comment-added", "comment-changed", "module-doc", "method-doc", "class-doc-removed", "layout", "blanks"],
)
def test_comments_docstrings_and_layout_keep_the_fingerprint(tmp_path: Path, edit: str, replace: tuple | None) -> None:
    before = code_fingerprint(["app", "app.mod"], _write_tree(tmp_path / "before", FINGERPRINTED))
    assert _fingerprint_after(tmp_path / "after", edit, replace) == before


@pytest.mark.parametrize(
    ("edit", "replace"),
    [
        (STATEMENT, None),
        ("", ("LIMIT = 3", "LIMIT = 4")),
        ("", ("return LIMIT", "return -LIMIT")),
        ("", ('"""The method\'s docstring."""', '"""The method\'s docstring."""\n        "not the docstring"')),
    ],
    ids=["statement-added", "constant-changed", "expression-changed", "bare-string-after-docstring"],
)
def test_a_statement_changes_the_fingerprint(tmp_path: Path, edit: str, replace: tuple | None) -> None:
    before = code_fingerprint(["app", "app.mod"], _write_tree(tmp_path / "before", FINGERPRINTED))
    assert _fingerprint_after(tmp_path / "after", edit, replace) != before


def test_the_fingerprint_covers_module_names_not_where_the_project_lies(tmp_path: Path) -> None:
    """A copied project keeps its cache; the same code under another module name is other code."""
    here = code_fingerprint(["app", "app.mod"], _write_tree(tmp_path / "here", FINGERPRINTED))
    assert code_fingerprint(["app", "app.mod"], _write_tree(tmp_path / "there", FINGERPRINTED)) == here
    renamed = _write_tree(tmp_path / "renamed", {"app/__init__.py": "", "app/other.py": FINGERPRINTED["app/mod.py"]})
    assert code_fingerprint(["app", "app.other"], renamed) != here


# -- the policy -------------------------------------------------------------------------------------------


def test_the_policy_keys_once_per_process_and_a_new_one_sees_the_change(toy: Path) -> None:
    """One policy object lives as long as its process, the code it runs loaded once: its key is kept."""
    policy = CodeVersion("app.main", root=toy, packages=("app",))
    assert policy.modules == tuple(TOY_CLOSURE)
    key = policy.compute_key(None, {}, None)
    (toy / "app" / "deep_rel.py").write_text(STATEMENT)
    assert policy.compute_key(None, {}, None) == key
    assert CodeVersion("app.main", root=toy, packages=("app",)).compute_key(None, {}, None) != key


def test_the_old_hand_list_still_builds_a_policy_from_its_entry_points(toy: Path) -> None:
    """`CodeVersion(modules=(...))` call sites keep working: each listed module counts with all it imports."""
    policy = CodeVersion(modules=(ModuleType("app.top"), ModuleType("app.rel")), root=toy, packages=("app",))
    assert policy.entry == ("app.top", "app.rel")
    assert policy.modules == ("app", "app.cycle_a", "app.cycle_b", "app.rel", "app.top")


# -- the real project ------------------------------------------------------------------------------------


def _stage_code(stage: str) -> CodeVersion:
    """The CodeVersion in a stage's wired-up cache policy."""
    module, name = STAGES[stage]
    policy: CachePolicy = getattr(import_module(module), name)
    found = [p for p in getattr(policy, "policies", [policy]) if isinstance(p, CodeVersion)]
    assert len(found) == 1, f"{module}.{name} has {len(found)} CodeVersion policies"
    return found[0]


def _last_names(modules: Sequence[str]) -> set[str]:
    return {name.rpartition(".")[2] for name in modules}


def test_ingest_covers_what_its_hand_list_left_out() -> None:
    modules = _stage_code("ingest").modules
    assert {"ingest", "ingest_swap", "workers", "fs"} <= _last_names(modules)


def _project_modules(root: Path) -> list[str]:
    return sorted(
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for path in (root / "lora_core").rglob("*.py")
    )


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_copy_of_the_project_keys_as_the_project_does(stage: str, tmp_path: Path) -> None:
    """The copies below stand for the real sources; the key does not depend on where they lie."""
    entry = _stage_code(stage).entry
    shutil.copytree(PROJECT_ROOT / "lora_core", tmp_path / "lora_core", ignore=shutil.ignore_patterns("__pycache__"))
    assert _key(entry, tmp_path) == _key(entry, PROJECT_ROOT)


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lora_core/ copied once: each edit below is undone before the next, so every key starts from the original."""
    root = tmp_path_factory.mktemp("project")
    shutil.copytree(PROJECT_ROOT / "lora_core", root / "lora_core", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _key(entry: tuple[str, ...], root: Path) -> str:
    """What a fresh process would key the stage on: a new policy, closure and fingerprint read again."""
    return CodeVersion(entry, root=root).compute_key(None, {}, None)


class _Edited:
    """Edit some modules of the copy for the length of a `with`, then put the original text back."""

    def __init__(self, root: Path, modules: Sequence[str], edit: Callable[[str], str]) -> None:
        self.paths = [module_file(name, root) for name in modules]
        self.edit = edit

    def __enter__(self) -> None:
        self.saved = [(path, path.read_text()) for path in self.paths]
        for path, text in self.saved:
            path.write_text(self.edit(text))

    def __exit__(self, *exc: object) -> None:
        for path, text in self.saved:
            path.write_text(text)


def _reword_docstring(text: str) -> str:
    """The module's docstring reworded; one added where it had none (still no statement)."""
    tree = ast.parse(text)
    doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
    if doc is None or not isinstance(doc.value, ast.Constant) or not isinstance(doc.value.value, str):
        return f'"""A cache probe: a docstring added."""\n{text}'
    lines = text.splitlines(keepends=True)
    assert doc.end_lineno is not None
    return "".join(lines[: doc.lineno - 1]) + '"""A cache probe: reworded."""\n' + "".join(lines[doc.end_lineno :])


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_statement_in_any_module_the_stage_imports_re_runs_it(stage: str, project_copy: Path) -> None:
    """The acceptance: one statement added to any module of the closure gives a new key, module by module."""
    code = _stage_code(stage)
    base = _key(code.entry, project_copy)
    kept = []
    for name in code.modules:
        with _Edited(project_copy, [name], lambda text: text + STATEMENT):
            if _key(code.entry, project_copy) == base:
                kept.append(name)
    assert not kept, f"{stage}: a statement added here kept the cache: {kept}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_change_elsewhere_or_a_comment_or_docstring_keeps_the_stage_cached(stage: str, project_copy: Path) -> None:
    """Statements in every module outside the closure, comments and docstrings in every module inside it."""
    code = _stage_code(stage)
    base = _key(code.entry, project_copy)
    elsewhere = sorted(set(_project_modules(project_copy)) - set(code.modules))
    assert elsewhere, f"{stage}: its closure is the whole of lora_core, so any change re-runs it"
    with _Edited(project_copy, elsewhere, lambda text: text + STATEMENT):
        assert _key(code.entry, project_copy) == base
    with _Edited(project_copy, code.modules, lambda text: _reword_docstring(text) + COMMENT):
        assert _key(code.entry, project_copy) == base

"""Cache policies keyed on content, never on paths alone or in-memory objects."""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect.cache_policies import CachePolicy

from lora_core.foundation.layout import SubjectLayout
from lora_core.foundation.sources import fingerprint_input

# The folder that holds `lora_core/` and `tasks/`: the code version is read from the sources here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(kw_only=True)
class InputContent(CachePolicy):
    """Key on the bytes of the input folder or zip named by `parameter`.

    An unchanged folder gives the same key wherever it was copied from; any
    added, removed or edited file gives a new one. `exclude_parameter` names a
    folder (the work folder, or a subject layout's) that is not part of the
    input even when it lies inside it.
    """

    parameter: str = "photos"
    exclude_parameter: str | None = "layout"

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: Any, **kwargs: Any) -> str:
        exclude = inputs.get(self.exclude_parameter) if self.exclude_parameter else None
        if isinstance(exclude, SubjectLayout):
            exclude = exclude.workdir
        return fingerprint_input(Path(inputs[self.parameter]), Path(exclude) if exclude else None)


def module_file(name: str, root: Path) -> Path | None:
    """The source file of dotted module `name` under `root` (a package's `__init__.py` first, as Python looks)."""
    parts = name.split(".")
    for path in (root.joinpath(*parts, "__init__.py"), root.joinpath(*parts[:-1], f"{parts[-1]}.py")):
        if path.is_file():
            return path
    return None


def _in_packages(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def _loaded_by(name: str, root: Path, packages: tuple[str, ...]) -> list[str]:
    """The project modules that importing `name` runs: each package on the way down, then the module itself.

    A name that is not a module (`lora_core.fs.sha256_file`, a function) stops at the module that holds it.
    """
    parts = name.split(".")
    loaded = []
    for end in range(1, len(parts) + 1):
        prefix = ".".join(parts[:end])
        if not _in_packages(prefix, packages):
            continue
        if module_file(prefix, root) is not None:
            loaded.append(prefix)
        elif not root.joinpath(*parts[:end]).is_dir():  # neither a module nor a namespace package: an attribute
            break
    return loaded


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement, at any depth (in functions, classes, `if`, `try`, `with`, `match`), skipping expressions.

    An import is always a statement, and expressions are most of a tree: walking statements only is several
    times faster than `ast.walk`.
    """
    for statement in body:
        yield statement
        for value in vars(statement).values():
            for item in value if isinstance(value, list) else ():
                if isinstance(item, ast.stmt):
                    yield from _statements([item])
                elif isinstance(item, ast.excepthandler | ast.match_case):
                    yield from _statements(item.body)


def _imported_names(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Every dotted name the module's import statements may load, wherever they stand.

    Imports inside functions and under `if TYPE_CHECKING:` count: the walk is
    conservative, a module named anywhere is one the stage may depend on. For
    `from a import b` both `a` and `a.b` are candidates (`b` may be a submodule).
    """
    package = name if is_package else name.rpartition(".")[0]
    names: set[str] = set()
    for node in _statements(tree.body):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                if node.level - 1 >= len(parts):  # above the top-level package: Python refuses it too
                    continue
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


@functools.lru_cache(maxsize=1024)
def _parsed_imports(source: bytes, filename: str, name: str, is_package: bool) -> frozenset[str]:
    """`_imported_names` of one source text, kept by content: each stage reads the shared modules again."""
    return frozenset(_imported_names(ast.parse(source, filename=filename), name, is_package))


def project_imports(entry: str | Iterable[str], root: Path, packages: Iterable[str] = ("lora_core",)) -> list[str]:
    """The sorted project modules that importing `entry` runs, transitively, read from the sources under `root`.

    Read with `ast`, never imported, so a list of a stage's code cannot go stale
    and nothing heavy (torch) loads to compute it. `entry` (one dotted name or
    several) and the `__init__.py` of every package on the way are in it.
    Modules outside `packages` (the standard library, third-party) are left out.
    """
    packages = tuple(packages)
    root = Path(root)
    seen: set[str] = set()
    for name in (entry,) if isinstance(entry, str) else entry:
        found = _loaded_by(name, root, packages)
        if name not in found:
            raise ValueError(f"{name!r} is not a module of {packages} under {root}")
        seen.update(found)
    todo = sorted(seen)
    while todo:
        name = todo.pop()
        path = module_file(name, root)
        assert path is not None  # only resolved names are queued
        for imported in _parsed_imports(path.read_bytes(), str(path), name, path.name == "__init__.py"):
            for module in _loaded_by(imported, root, packages):
                if module not in seen:
                    seen.add(module)
                    todo.append(module)
    return sorted(seen)


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    """Drop the docstring of the module and of each class and function (only the first statement, as Python)."""
    scopes = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    for node in [tree, *_statements(tree.body)]:
        if isinstance(node, scopes) and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:]
    return tree


def normalized_source(source: str | bytes, filename: str = "<source>") -> str:
    """The module's syntax tree without docstrings: comments, blank lines, formatting and docs do not show."""
    return ast.dump(_strip_docstrings(ast.parse(source, filename=filename)))


@functools.lru_cache(maxsize=1024)
def _source_digest(source: bytes, filename: str) -> str:
    """sha256 of one source text's normalized form, kept by content (ast.dump is the slow part)."""
    return hashlib.sha256(normalized_source(source, filename).encode()).hexdigest()


def code_fingerprint(modules: Iterable[str], root: Path) -> str:
    """sha256 over each module's name and normalized source: a statement changes it, a comment or docstring not.

    Independent of where `root` is, so a copied project keeps its cache.
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        path = module_file(name, Path(root))
        if path is None:
            raise ValueError(f"no source for module {name!r} under {root}")
        digest.update(f"{name}\0{_source_digest(path.read_bytes(), str(path))}\0".encode())
    return digest.hexdigest()


@dataclass(init=False)
class CodeVersion(CachePolicy):
    """Key on the source of every project module the stage's `lora_core` entry point imports, transitively.

    `CodeVersion("lora_core.dataset.ingest")`: a statement changed in any
    module that ingest imports (however deep) re-runs the stage; a comment or
    docstring, or a module it does not import, keeps the cache. A stage that
    calls more than one entry point names them all. An entry point that is no
    module fails when the policy is made, not silently at run time (Prefect
    would only log it and stop caching). The closure and its fingerprint are
    computed at the first key and kept: once per process, for the code that
    process runs. `modules=` (module objects, the old hand list) is still
    taken: their names become entry points.
    """

    entry: tuple[str, ...] = ()
    root: Path = field(default=PROJECT_ROOT, repr=False)
    packages: tuple[str, ...] = ("lora_core",)

    def __init__(
        self,
        entry: str | Iterable[str] = (),
        *,
        modules: Iterable[ModuleType] = (),
        root: Path | None = None,
        packages: Iterable[str] = ("lora_core",),
        **policy: Any,
    ) -> None:
        super().__init__(**policy)
        entries = (entry,) if isinstance(entry, str) else tuple(entry)
        self.entry = tuple(dict.fromkeys((*entries, *(module.__name__ for module in modules))))
        self.root = Path(root) if root is not None else PROJECT_ROOT
        self.packages = tuple(packages)
        if not self.entry:
            raise ValueError("CodeVersion needs an entry point, e.g. CodeVersion('lora_core.dataset.ingest')")
        for name in self.entry:
            if name not in _loaded_by(name, self.root, self.packages):
                raise ValueError(f"CodeVersion: {name!r} is not a module of {self.packages} under {self.root}")
        self._modules: tuple[str, ...] | None = None
        self._fingerprint: str | None = None

    @classmethod
    def of_task(cls, task_module: str, root: Path | None = None) -> CodeVersion:
        """The code version of a stage: the closure of every lora_core module its task module (`__name__`)
        imports. No list to keep: a new import in the task is a new entry point."""
        root = Path(root) if root is not None else PROJECT_ROOT
        path = module_file(task_module, root)
        if path is None:
            raise ValueError(f"CodeVersion: no module {task_module!r} under {root}")
        imported = _parsed_imports(path.read_bytes(), str(path), task_module, path.name == "__init__.py")
        entries = {found[-1] for name in imported if (found := _loaded_by(name, root, ("lora_core",)))}
        return cls(sorted(entries), root=root)

    @property
    def modules(self) -> tuple[str, ...]:
        """The dotted names of the modules the key covers (the entry points' closure), sorted."""
        if self._modules is None:
            self._modules = tuple(project_imports(self.entry, self.root, self.packages))
        return self._modules

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: Any, **kwargs: Any) -> str:
        if self._fingerprint is None:
            self._fingerprint = code_fingerprint(self.modules, self.root)
        return self._fingerprint

"""The layout's promises, kept by a test so they stay kept: small modules, thin tasks, a flow that reads
like the recipe (issue 13's limits)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 45  # "about 40", docstring included, in flows/ and tasks/
MAX_FLOW_LINES = 60


def _modules(*packages: str) -> list[Path]:
    return sorted(path for package in packages for path in (ROOT / package).rglob("*.py"))


def _functions(path: Path) -> list[tuple[str, int]]:
    """Each function's length from its docstring to its end: the signature, one parameter a line where a
    flow's parameters are a form in the UI, is not the function's logic."""
    tree = ast.parse(path.read_text())
    return [
        (node.name, node.end_lineno - node.body[0].lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


@pytest.mark.parametrize(
    "path", _modules("lora_core", "tasks", "flows", "deployments", "bench"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, f"{path}: split it by concept"


@pytest.mark.parametrize("path", _modules("tasks", "flows", "deployments"), ids=lambda p: str(p.relative_to(ROOT)))
def test_tasks_and_flows_are_thin(path):
    long = [(name, lines) for name, lines in _functions(path) if lines > MAX_FUNCTION_LINES]
    assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_flow_reads_like_the_recipe():
    lines = dict(_functions(ROOT / "flows" / "train_subject.py"))
    assert lines["train_subject"] <= MAX_FLOW_LINES
    source = (ROOT / "flows" / "train_subject.py").read_text()
    for stage in ("ingest_photos", "check_images", "crop_images", "bucket_images", "caption_images", "train_epoch"):
        assert f"{stage}(" in source  # each stage is called as itself, no runner restating its arguments
    assert "refresh_cache" not in source  # refresh is the stages' own decision (tasks/stage.py)

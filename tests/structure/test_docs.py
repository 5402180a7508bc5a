"""The README is the front door and docs/ holds the rest (issue 21): the README stays short, every page it
promises is linked from it, and no relative link or `#anchor` in README.md or docs/*.md points at nothing.

Links are read as GitHub renders them: fenced code blocks, indented code blocks and inline code are not
links; http(s) and mailto links are left to the web. Anchors follow GitHub's heading slugs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_README_LINES = 200
# The pages issue 21 splits the README into; each must be reachable from the front door.
DOCS_PAGES = (
    "usage.md",
    "dataset-checks.md",
    "training.md",
    "selection.md",
    "deployments.md",
    "architecture.md",
    "reliability.md",
)

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = ("http://", "https://", "mailto:")


@dataclass(frozen=True)
class Link:
    page: Path
    line: int
    target: str

    def where(self, root: Path) -> str:
        return f"{self.page.resolve().relative_to(root)}:{self.line}: ({self.target})"


def prose_lines(text: str) -> list[tuple[int, str]]:
    """The lines GitHub renders as prose, numbered from 1: code blocks are dropped, since a `[x](y)` or a
    `# comment` inside one is neither a link nor a heading."""
    lines: list[tuple[int, str]] = []
    fence: str | None = None
    previous_blank_or_code = True
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
                fence = None
            continue
        if match:
            fence = match.group(1)
            continue
        indented_code = previous_blank_or_code and line.startswith(("    ", "\t")) and line.strip() != ""
        previous_blank_or_code = line.strip() == "" or indented_code
        if not indented_code:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lowercased, punctuation but '-' and '_' dropped,
    each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on a page; a repeated heading gets '-1', '-2'... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[Link]:
    """The relative links on a page, outside code."""
    found: list[Link] = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for match in _LINK.finditer(_INLINE_CODE.sub("", line)):
            target = match.group(1)
            if target and not target.startswith(_EXTERNAL):
                found.append(Link(page, number, target))
    return found


def broken(link: Link, root: Path = ROOT) -> str | None:
    """Why a link points at nothing, or None when it lands: the file exists inside the repository and, for
    an `#anchor`, the target page has that heading."""
    root = root.resolve()
    path_part, _, anchor = link.target.partition("#")
    target = (link.page.parent / path_part).resolve() if path_part else link.page.resolve()
    if not target.is_relative_to(root):
        return f"{link.where(root)}: outside the repository"
    if not target.exists():
        return f"{link.where(root)}: no such file {target.relative_to(root)}"
    if not anchor:
        return None
    if target.suffix != ".md":
        return f"{link.where(root)}: an anchor into a file that is not markdown"
    if anchor not in anchors(target):
        return f"{link.where(root)}: no heading '#{anchor}' in {target.relative_to(root)}"
    return None


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_front_door() -> None:
    """Issue 21: at most about 200 lines; the detail lives in docs/."""
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_lands(page: Path) -> None:
    """A moved file or a renamed heading must not leave a link pointing at nothing."""
    problems = [problem for link in links(page) if (problem := broken(link))]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """Each page is reachable from the front door, not only from another page."""
    linked = {(README.parent / link.target.partition("#")[0]).resolve() for link in links(README)}
    missing = [name for name in DOCS_PAGES if (ROOT / "docs" / name).resolve() not in linked]
    assert not missing, f"not linked from README.md: {missing}"


def test_slugs_follow_github() -> None:
    """The checker is only as good as its slugs: these are GitHub's anchors for headings like ours."""
    assert slug("Dataset checks: `checks` and `crop`") == "dataset-checks-checks-and-crop"
    assert slug("When a run is interrupted, shared or short of room") == (
        "when-a-run-is-interrupted-shared-or-short-of-room"
    )
    assert slug("Undertrained → resume by itself") == "undertrained--resume-by-itself"
    assert slug("The pipeline's own folder: `.pipeline/`") == "the-pipelines-own-folder-pipeline"
    assert slug("bench.gpu (smoke_test)") == "benchgpu-smoke_test"


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    """A checker that passes everything proves nothing: a page with a missing file, a missing heading and a
    link hidden in code must give exactly the two broken links."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Front\n\n"
        "[ok](docs/other.md#two-words-1) [ok](#front) [gone](docs/missing.md) [bad](docs/other.md#three)\n"
        "`[code](nowhere.md)` [web](https://example.com/x#y)\n\n"
        "```\n[fenced](nowhere.md)\n```\n\n"
        "    [indented](nowhere.md)\n",
        encoding="utf-8",
    )
    found = links(page)
    assert [link.target for link in found] == [
        "docs/other.md#two-words-1",
        "#front",
        "docs/missing.md",
        "docs/other.md#three",
    ]
    problems = [problem for link in found if (problem := broken(link, tmp_path))]
    assert len(problems) == 2
    assert "no such file docs/missing.md" in problems[0]
    assert "no heading '#three'" in problems[1]

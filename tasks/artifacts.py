"""How stage results look in the Prefect UI: table and markdown artifacts."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact, create_table_artifact

_TABLE_COLUMNS = ("source", "status", "reason", "image", "width", "height", "resized", "exif_rotated")


def artifact_key(token: str, stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{token}-{stage}".lower()).strip("-")


def publish_ingest(token: str, rows: list[dict], summary: str) -> None:
    """Every input file with its status and reason, and a short summary."""
    table = [{column: row.get(column, "") for column in _TABLE_COLUMNS} for row in rows]
    create_table_artifact(
        key=artifact_key(token, "ingest"),
        table=table,
        description=f"Ingest of {token}: every input file with its status and reason",
    )
    create_markdown_artifact(key=artifact_key(token, "ingest-summary"), markdown=summary)


def ingest_summary(token: str, rows: list[dict], repeats: int | None, notes: list[str], error: str = "") -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("accepted", "rejected", "ignored")}
    lines = [f"# Ingest of `{token}`", ""]
    if error:
        lines += ["**Failed:** " + error.splitlines()[0], ""]
    lines += [
        f"- accepted: **{counts['accepted']}**",
        f"- rejected: {counts['rejected']}",
        f"- ignored: {counts['ignored']}",
    ]
    if repeats is not None:
        lines.append(f"- repeats per image: {repeats} (folder `training_images/{repeats}_{token}`)")
    resized = sum(bool(r.get("resized")) and r["status"] == "accepted" for r in rows)
    if resized:
        lines.append(f"- downscaled to the long-side limit: {resized}")
    lines += [f"- note: {note}" for note in notes]
    problems = [r for r in rows if r["status"] == "rejected"]
    if problems:
        lines += ["", "## Rejected", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{r['source']}` | {r['reason']} |" for r in problems]
    return "\n".join(lines) + "\n"

"""What a flow run did, stage by stage: the summary a flow returns and the command line prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import BaseModel

StageName = Literal["ingest", "checks", "crop", "buckets", "captions", "train", "samples", "select"]
STAGES: tuple[str, ...] = get_args(StageName)

# Per-image rows stay in the manifest and the artifacts; the summary holds the counts.
_BULKY: dict[str, set[str]] = {
    "ingest": {"rows"},
    "checks": {"rows"},
    "crop": {"rows"},
    "buckets": {"rows"},
    "captions": {"records"},
    "select": {"metrics", "record"},
}


def check_stage(stop_after: str) -> str:
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {', '.join(STAGES)}, got {stop_after!r}")
    return stop_after


@dataclass
class Report:
    """The summary so far; `add` records a stage and says whether the run stops after it."""

    stop_after: str = STAGES[-1]
    cached: list[str] = field(default_factory=list)  # stages answered from Prefect's cache, in call order
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_stage(self.stop_after)
        self.summary["cached"] = self.cached

    def reaches(self, stage: str) -> bool:
        return STAGES.index(self.stop_after) >= STAGES.index(stage)

    def add(self, stage: str, result: BaseModel | dict[str, Any]) -> bool:
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json", exclude=_BULKY.get(stage))
        self.summary[stage] = result
        if STAGES.index(stage) >= STAGES.index(self.summary.get("stage", STAGES[0])):
            self.summary["stage"] = stage  # the furthest stage reached (a resume trains again after select)
        return stage == self.stop_after

    def add_training(self, epochs: list[Any], final: Any) -> bool:
        """The epochs trained so far (their numbers, not every step's loss) and the file users load."""
        trained = [epoch.model_dump(mode="json", exclude={"losses", "lrs"}) for epoch in epochs]
        return self.add("train", {"epochs": trained, "final": str(final)})

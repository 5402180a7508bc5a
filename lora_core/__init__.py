"""The pure library behind the pipeline: no Prefect here, so every stage is testable alone.

Its folders are its layers, bottom-up; a module imports only from its own
layer and those below it (tests/structure/test_structure.py checks every
import). docs/architecture.md says what each layer holds.
"""

__all__ = ["LAYERS"]

# The layer folders from the bottom up: the one place their order is written.
LAYERS: tuple[str, ...] = (
    "foundation",
    "checks",
    "config",
    "dataset",
    "families",
    "training",
    "evaluation",
    "setup",
)

"""Typed errors raised by the library; `specan.cli` turns each into one line and an exit code.

Every error names the file it is about, so the one line a user sees is enough to act on.
"""

from __future__ import annotations

from pathlib import Path


class SpecanError(Exception):
    """Base class: an expected failure with a message fit for a user."""

    exit_code = 1


class RunNotFoundError(SpecanError):
    """The run folder does not exist or is not a folder."""

    exit_code = 2

    def __init__(self, path: Path | str, reason: str = "no such folder") -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {reason}")


class EmptyRunError(SpecanError):
    """The folder exists but holds no checkpoint specan can read."""

    exit_code = 2

    def __init__(self, path: Path | str, detail: str = "") -> None:
        self.path = Path(path)
        msg = f"{self.path}: no checkpoints found (looked for *.safetensors, checkpoints/, "
        msg += "checkpoint-N/, stepN/ and sharded model.safetensors.index.json)"
        super().__init__(msg + (f"; {detail}" if detail else ""))


class BadCheckpointError(SpecanError):
    """A checkpoint file is unreadable: truncated, not safetensors, or inconsistent."""

    exit_code = 3

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class RunFileError(BadCheckpointError):
    """run.json or metrics.jsonl of a run is unreadable."""


class ShapeMismatchError(BadCheckpointError):
    """A checkpoint's parameters differ in name or shape from the run's other checkpoints."""


class OptionError(SpecanError):
    """An option names something that cannot be used here (e.g. an unavailable SVD backend)."""

    exit_code = 2


class RunsMismatchError(SpecanError):
    """Runs compared share nothing to compare on (no step, no epoch in common)."""

    exit_code = 2


class ViewRuleError(SpecanError):
    """A parameter cannot be turned into a matrix view under the requested rule."""

    exit_code = 2


class StoreError(SpecanError):
    """The store is missing, locked by another writer, or not a specan store."""

    exit_code = 4


class ViewNotFoundError(StoreError, LookupError):
    """A view key the store does not hold."""


class StoreExistsError(StoreError):
    """A store exists where a new one would be created, and --overwrite was not given."""


class StoreLockedError(StoreError):
    """Another live process is writing this store."""


class SchedulerError(SpecanError):
    """The Dask cluster failed a task or could not be used; what was written is kept."""

    exit_code = 6


class PruneError(SpecanError):
    """Singular-value pruning asked for singular triplets that are not there (a top-k store)."""

    exit_code = 4


class ModelError(SpecanError):
    """A run cannot be rebuilt as a model (no run.json written by specan's trainers)."""

    exit_code = 2

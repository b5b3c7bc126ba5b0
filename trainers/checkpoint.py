"""The one module the trainers share: the run directory of DESIGN Contract 1, written atomically.

    runs/<name>/
      run.json              trainer, its config (every default), model config, pairs, schema
      metrics.jsonl         one JSON object per evaluation: step, epoch, losses, accuracies
      checkpoints/step-XXXXXXXX.safetensors   the model's state_dict; metadata step, epoch, config
      resume.safetensors    the newest model + optimizer + RNG state, to continue a killed run
      optimizer/step-XXXXXXXX.safetensors   optimizer state at chosen steps (an LMC trunk's
                            split points), so a branch resumes it; not a checkpoint: ingest
                            reads checkpoints/ only
      finished.json         written last, when training ends: {"step": the last checkpoint's step}

Every file is written under a temporary name and renamed into place, so a reader (or `specan
ingest` running beside the trainer) never sees half a file. Only this module knows file names.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
FINISHED = "finished.json"  # the end marker: `specan ingest --watch` stops once it is there
T = TypeVar("T")


# -- configuration ----------------------------------------------------------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """Trailing comments of a dataclass's fields: `lr: float = 1e-3  # learning rate` -> help."""
    try:
        lines = inspect.getsource(cls).splitlines()
        tree = ast.parse("\n".join(lines).strip() if lines[0].startswith(" ") else "\n".join(lines))
    except (OSError, TypeError, SyntaxError):
        return {}
    comments = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            if "#" in line:
                comments[node.target.id] = line.split("#", 1)[1].strip()
    return comments


def parse_config(cls: type[T], argv: Sequence[str] | None, *, prog: str, description: str) -> T:
    """Build `cls` (a dataclass of literal defaults) from command-line flags.

    Every field becomes ``--field-name`` (a trailing underscore, as in ``from_``, is dropped:
    ``--from``); its trailing source comment is the help, and the help shows the default, so
    ``--help`` names the paper's settings.
    """
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    ap = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + f.name.rstrip("_").replace("_", "-")
        kind = hints[f.name]
        help_ = comments.get(f.name, " ")
        if kind is bool:
            ap.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_,
                dest=f.name,
            )  # fmt: skip
        else:
            ap.add_argument(flag, type=_optional(kind), default=f.default, help=help_, dest=f.name)
    return cls(**vars(ap.parse_args(argv)))


def _optional(kind: Any) -> Any:
    # "str | None" and the like: the flag takes the non-None type
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    return args[0] if args else kind


def save_steps(total: int, *, every: int = 0, log: int = 0, at: str = "") -> set[int]:
    """Steps at which to save, always including 0 and ``total``.

    ``every`` N steps; ``log`` about that many log-spaced steps (dense early, where weights move
    fastest); ``at`` an explicit comma-separated list. They combine.
    """
    steps = {0, total}
    if every > 0:
        steps.update(range(0, total + 1, every))
    if log > 0:
        steps.update(
            min(total, round(math.exp(math.log(total + 1) * i / log)) - 1) for i in range(log + 1)
        )
    if at.strip():
        try:
            steps.update(int(s) for s in at.split(",") if s.strip())
        except ValueError as e:
            raise ValueError(f"--save-at takes comma-separated steps, got {at!r}") from e
    return {s for s in steps if 0 <= s <= total}


class OptionValueError(ValueError):
    """A trainer option this machine cannot honour (e.g. --device cuda without CUDA)."""


def resolve_device(name: str) -> torch.device:
    """``--device``'s torch device, or OptionValueError saying why this machine has none such."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionValueError(f"--device {name}: not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
            raise OptionValueError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"{why}); use --device cpu"
            )
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise OptionValueError(f"--device {name}: this machine has {n} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionValueError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


# -- writing ----------------------------------------------------------------------------------
def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunWriter:
    """Writes one run directory; reopening it with the same trainer and config resumes it.

    Parameters
    ----------
    out
        The run directory (created).
    trainer
        The trainer's module name under `trainers` (``grokking``, ``vgg``, …).
    config
        ``dataclasses.asdict(cfg)``: every setting, enough to rebuild model and data.
    pairs
        The model's alignment pairs (SPEC §3) as ``{"prev", "next", "kind", ...}`` dicts.
    view_rules
        Parameter name -> view rule where names do not say it (e.g. transposed convolutions).
    parent
        For a run branched from another run's checkpoint (LMC): ``{"run", "step", ...}``.
    """

    def __init__(
        self,
        out: Path | str,
        *,
        trainer: str,
        config: dict[str, Any],
        pairs: Iterable[dict[str, Any]] = (),
        view_rules: dict[str, str] | None = None,
        model: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
    ) -> None:
        self.out = Path(out)
        self.ckpt_dir = self.out / "checkpoints"
        self.meta = {
            "schema_version": SCHEMA_VERSION,
            "trainer": trainer,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()},
            "model": model or {},
            "pairs": list(pairs),
            "view_rules": view_rules or {},
            **({"parent": parent} if parent else {}),
        }
        # made first: in an --out like new/../run, "new" must exist before the system can see
        # run/run.json, or another run there would be taken for none and written over
        self.out.mkdir(parents=True, exist_ok=True)
        run_json = self.out / "run.json"
        if run_json.exists():
            from specan.runfile import read_config

            clash = _clash(read_config(self.out), self.meta)
            if clash:
                raise FileExistsError(f"{self.out} holds {clash} (use another --out)")
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        # a resumed run trains on: it is not finished until it says so again
        (self.out / FINISHED).unlink(missing_ok=True)
        self.last_step: int | None = None
        _OPEN.append(self)
        _atomic(run_json, lambda p: p.write_text(json.dumps(self.meta, indent=2) + "\n"))

    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step-{step:08d}.safetensors"

    def save(
        self,
        model: torch.nn.Module,
        step: int,
        *,
        epoch: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Path:
        """Write the checkpoint for ``step`` and the resume state beside it."""
        from safetensors.torch import save_file

        meta = {"step": str(step), "config": json.dumps(self.meta["config"])}
        if epoch is not None:
            meta["epoch"] = str(epoch)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        path = self.checkpoint_path(step)
        _atomic(path, lambda p: save_file(state, str(p), metadata=meta))
        resume = {f"model.{k}": v for k, v in state.items()}
        resume.update(_rng_state())
        if optimizer is not None:
            tensors, groups = _flatten_optimizer(optimizer)
            resume.update(tensors)
            meta["optimizer_groups"] = json.dumps(groups)
        _atomic(self.out / "resume.safetensors", lambda p: save_file(resume, str(p), metadata=meta))
        self.last_step = step
        return path

    def finish(self) -> None:
        """Write the end marker: no checkpoint follows. `run_main` calls it when training ends."""
        record = json.dumps({"step": self.last_step}) + "\n"
        _atomic(self.out / FINISHED, lambda p: p.write_text(record))
        if self in _OPEN:
            _OPEN.remove(self)

    def save_mask(self, masks: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        """Write a lottery ticket's masks (parameter name -> 0/1 tensor) to ``mask.safetensors``,
        with `meta` (how they were made) as JSON in its metadata."""
        from safetensors.torch import save_file

        path = mask_path(self.out)
        tensors = {k: v.detach().contiguous().cpu() for k, v in masks.items()}
        _atomic(path, lambda p: save_file(tensors, str(p), metadata={"mask": json.dumps(meta)}))
        return path

    def save_optimizer(self, optimizer: torch.optim.Optimizer, step: int) -> Path:
        """Keep the optimizer state at ``step`` (momentum buffers, hyperparameters) in
        `optimizer_path`, for runs started from this run's checkpoint at that step
        (`load_optimizer`). Unlike resume.safetensors it is not replaced by later steps."""
        from safetensors.torch import save_file

        path = optimizer_path(self.checkpoint_path(step))
        path.parent.mkdir(exist_ok=True)
        tensors, groups = _flatten_optimizer(optimizer)
        meta = {"step": str(step), "optimizer_groups": json.dumps(groups)}
        _atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))
        return path

    def log(self, record: dict[str, Any]) -> None:
        """Append one evaluation to metrics.jsonl (flushed, so a kill loses nothing logged)."""
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def resume(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> int | None:
        """Load the newest resume state into ``model`` (and ``optimizer``); return its step.

        None when there is nothing to resume. Metrics logged after that step (the killed
        run's work since its last checkpoint, and half a line a kill cut) are dropped, so the
        run goes on as if never killed: steps stay monotone and no evaluation is logged twice.
        """
        path = self.out / "resume.safetensors"
        if not path.exists():
            # killed before its first checkpoint: the run starts over and logs step 0 again
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        step = int(meta["step"])
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if optimizer is not None and "optimizer_groups" in meta:
            optimizer.load_state_dict(
                _unflatten_optimizer(tensors, json.loads(meta["optimizer_groups"]))
            )
        _set_rng_state(tensors)
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if _logged_by(line, step)]
            _atomic(metrics, lambda p: p.write_text("".join(x + "\n" for x in kept)))
        # a run killed after its last checkpoint resumes with nothing left to save, and its end
        # marker still names that checkpoint
        self.last_step = step
        return step


def _logged_by(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of a step up to ``step``."""
    try:
        record = json.loads(line)
    except ValueError:  # half a line: the kill came mid-write
        return False
    return isinstance(record, dict) and record.get("step", 0) <= step


_OPEN: list[RunWriter] = []  # writers of the training now running, finished when it returns


def finish_runs(main: Any, argv: Sequence[str]) -> None:
    """Run a trainer's ``main(argv)``; when it returns, mark the runs it wrote as finished.

    A trainer that raises (or is killed) leaves no end marker: its run is resumable, not done.
    """
    del _OPEN[:]
    main(argv)
    for writer in list(_OPEN):
        writer.finish()


def branch_name(split: int, seed: int, eta: float | None = None) -> str:
    """The folder of a branch inside its trunk in an LMC folder (DESIGN Contract 1):
    ``branch-<split step>-<seed>``, and ``-eta<eta>`` for a perturbed branch."""
    return f"branch-{split}-{seed}" + ("" if eta is None else f"-eta{eta:g}")


def mask_path(run: Path | str) -> Path:
    """Where a lottery-ticket run keeps its masks (`RunWriter.save_mask`)."""
    return Path(run) / "mask.safetensors"


def optimizer_path(checkpoint: Path | str) -> Path:
    """Where the optimizer state kept with the checkpoint file `checkpoint` lives
    (`RunWriter.save_optimizer`): ``<run>/optimizer/<the checkpoint's file name>``, outside
    checkpoints/ so that no reader takes it for weights."""
    path = Path(checkpoint)
    return path.parent.parent / "optimizer" / path.name


def load_optimizer(checkpoint: Path | str, optimizer: torch.optim.Optimizer) -> bool:
    """Load into `optimizer` the state kept with the checkpoint file `checkpoint`; False, the
    optimizer untouched, when none was kept (`RunWriter.save_optimizer`)."""
    from safetensors import safe_open

    path = optimizer_path(checkpoint)
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    optimizer.load_state_dict(_unflatten_optimizer(tensors, json.loads(meta["optimizer_groups"])))
    return True


def _clash(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What makes the run in a folder another run than ``new``, naming the options; "" if none.

    ``--out`` itself is not compared: the same folder may be spelt another way.
    """
    if old.get("trainer") != new["trainer"]:
        return f"a {_shown(old.get('trainer'))} run, not {new['trainer']}"
    was, now = old.get("config", {}), json.loads(json.dumps(new["config"]))
    if not isinstance(was, dict):
        return "a run whose run.json config is not a JSON object"
    keys = [k for k in {**was, **now} if k != "out" and was.get(k, _UNSET) != now.get(k, _UNSET)]
    return ("a run with " if keys else "") + "; ".join(
        f"--{_shown(k).replace('_', '-')} {_shown(was.get(k, _UNSET))}, "
        f"not {_shown(now.get(k, _UNSET))}"
        for k in keys
    )


_UNSET = object()


def _shown(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    # quoted when empty or holding control characters: the refusal stays one readable line
    shown = (
        repr(value)
        if isinstance(value, str) and not value.isprintable() or value == ""
        else str(value)
    )
    return shown[:80]


def _rng_state() -> dict[str, torch.Tensor]:
    import torch

    return {"rng.torch": torch.get_rng_state()}


def _set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    import torch

    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state as flat tensors plus JSON groups: safetensors holds no nested objects."""
    import torch

    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().contiguous().cpu()
            elif value is not None:
                tensors[f"optim.{idx}.{name}"] = torch.tensor(value)
    return tensors, sd["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def run_main(main: Any, argv: Sequence[str]) -> None:
    """`python -m specan_trainers.X`: a bad --data path or --device, or a clashing --out, is one
    line and exit code 2."""
    from specan_trainers.data import DataError

    try:
        finish_runs(main, argv)
    except (DataError, FileExistsError, OptionValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

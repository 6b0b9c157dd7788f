"""What every experiment shares: its run context, atomic checkpoints, result and figure.

An experiment module defines

* ``NAME`` (the command name), a docstring (the claim, the setup, every choice made),
* ``PRESETS``: ``{"smoke": {...}, "quick": {...}, "full": {...}}`` — plain config dicts
  (``smoke`` runs in seconds in the test suite, ``quick`` in minutes on a 2-core CPU,
  ``full`` is paper scale, meant for a GPU),
* ``run(ctx: RunContext) -> dict``: the JSON-able result (config and every curve),
* ``plot(result: dict, path: Path) -> None``: the figure.

Resumable runs. A long experiment calls ``ctx.checkpoint(state)`` every few epochs with
everything it needs to continue (model/optimizer states, curves so far, RNG states) and
starts with ``state = ctx.restore()``: None for a fresh run, the last checkpoint with
``--resume``. Checkpoints are written to a temporary file and renamed over the old one,
so a run killed at any moment (even SIGKILL) leaves either the previous or the new
checkpoint, never a torn one. A resumed run is bitwise identical to an uninterrupted one
on the CPU as long as the experiment derives all randomness from the checkpointed state.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scaleinv_kernels.ensemble.distributed import DistInfo

PRESET_NAMES = ("smoke", "quick", "full")
CHECKPOINT = "checkpoint.pt"


@dataclass
class RunContext:
    """Everything an experiment's ``run`` needs besides its own code."""

    name: str
    preset: str
    config: dict[str, Any]
    out: Path  # <out>/<experiment>
    device: torch.device
    seed: int
    data: str = "mnist5k"
    data_root: Path | None = None
    resume: bool = False
    progress: bool = True
    #: this process's rank under torchrun (a single process by default); only the main
    #: rank writes checkpoints and shows progress
    dist: DistInfo = field(default_factory=DistInfo)
    started: float = field(default_factory=time.perf_counter)

    # ---- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def restore(self) -> dict | None:
        """The last checkpoint's state when resuming (None for a fresh run). Refuses a
        checkpoint written with another configuration."""
        if not self.resume or not self.checkpoint_path.exists():
            return None
        saved = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        if saved.get("config") != self._identity():
            raise ValueError(
                f"{self.name}: {self.checkpoint_path} was written by a run with another "
                f"configuration ({saved.get('config')}); use another --out or drop --resume")
        return saved["state"]

    def checkpoint(self, state: dict) -> None:
        """Atomically replace the checkpoint with ``state`` (temp file + rename); only the
        main rank writes (``state`` must then hold every member: gather first)."""
        if not self.dist.is_main:
            return
        atomic_save({"config": self._identity(), "state": state}, self.checkpoint_path)

    def _identity(self) -> dict:
        return {"name": self.name, "preset": self.preset, "config": self.config,
                "seed": self.seed, "data": self.data}

    def progress_bar(self, iterable, **kwargs):
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=not (self.progress and self.dist.is_main), leave=False,
                    desc=kwargs.pop("desc", self.name), **kwargs)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def to_jsonable(obj: Any) -> Any:
    """Tensors/arrays → lists, NaN/inf → None (strict JSON), tuples → lists."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(result: dict, out: Path) -> Path:
    """``<out>/result.json`` (atomic)."""
    path = out / "result.json"
    atomic_write_text(json.dumps(to_jsonable(result), indent=1) + "\n", path)
    return path


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (5.0, 3.6)):
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    return fig, axes


def save_figure(fig, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cpu_rng_state() -> dict:
    """Global RNG states to checkpoint (torch CPU; CUDA when present)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

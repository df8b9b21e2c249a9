"""Training state on disk for ``train.py``: atomic checkpoint writes, reading them back with a
clear error, and the random number generators' state of every rank.

A checkpoint is one ``torch.save`` file holding the model (unwrapped from DDP and
``torch.compile``), optimizer, scheduler, scaler, the position in training (epoch, step) and
each rank's RNG state, as tensors and plain Python values: ``torch.load(weights_only=True)``
reads it, and ``load_pretrained(path, source="mvit2")`` takes its model. It is written to a
temporary file in the same folder, flushed to disk, then renamed over the previous one: a rename
within one file system is atomic, so a run killed mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointReadError(RuntimeError):
    """A checkpoint that is missing, truncated or not one of ours."""


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; a clear error if it cannot be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"no checkpoint at {str(path)!r} (nothing to resume from; "
                                  "start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError) as e:  # what torch.load raises on truncated or foreign files
        raise CheckpointReadError(f"checkpoint {str(path)!r} is unreadable (truncated or not "
                                  f"a torch.save file): {type(e).__name__}: {e}") from None
    missing = {"model", "optimizer", "epoch", "step", "args"} - set(state) if isinstance(
        state, dict) else {"everything"}
    if missing:
        raise CheckpointReadError(f"{str(path)!r} is not a train.py checkpoint (missing "
                                  f"{', '.join(sorted(missing))})")
    return state


def rng_state() -> dict[str, Any]:
    """The state of every generator a training step draws from, on this rank."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # Tensors and plain Python values only, so that torch.load(weights_only=True) reads it.
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

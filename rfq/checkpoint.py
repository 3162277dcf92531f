"""Atomic checkpoints: written to a temporary file in the same folder, fsynced, then renamed over
the target, so a crash mid-write leaves the previous checkpoint intact. Loading checks the
format and that the checkpoint was made by a compatible run before anything is restored."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FORMAT = "rfq-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load(path: str | os.PathLike, kind: str | None = None, map_location="cpu") -> dict:
    """Load and validate a checkpoint; ``kind`` ("float", "coupled", "lsq") must match if given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} is corrupt or not an rfq checkpoint "
                              f"({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an rfq checkpoint")
    if obj.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {obj.get('version')}, this rfq "
                              f"reads version {VERSION}")
    if kind is not None and obj.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {obj.get('kind')!r} model, expected {kind!r}")
    return obj


def check_compatible(saved: dict, current: dict, keys, path) -> None:
    """Raise if the run settings that shape the model differ from the checkpoint's."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was made by a different run; "
                              + "; ".join(diffs))

"""Checkpoints that survive interruption and load safely (chapter 7).

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(..., weights_only=True)`` (no arbitrary
pickles).  It is written atomically: first to a temporary file in the same
folder, flushed to disk, then renamed over the old one, so a run killed in the
middle of a save leaves the previous checkpoint intact.  It carries the model
configuration, so loading into a different model is reported clearly.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from . import _checks
from .errors import CheckpointError
from .models import MODELS, build_model

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "check_config", "CheckpointError"]

_PLAIN = (torch.Tensor, int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(value, where: str) -> None:
    """Everything in a checkpoint must load with ``weights_only=True``: tensors, numbers, strings,
    ``None`` and lists / tuples / dicts of them. Fail before writing anything, naming the entry."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; checkpoint keys must be "
                                f"str or numbers so that torch.load(..., weights_only=True) can read them")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where} is {_checks.describe(value)}, which torch.load(..., weights_only=True) "
                        f"cannot read; store tensors, numbers, strings and lists / dicts of them")


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + ``os.replace``)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {_checks.describe(state)}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {_checks.describe(path)}")
    _check_plain(state, "state")
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write the checkpoint {path}: it is a folder; give a file path inside it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise CheckpointError(f"cannot write the checkpoint {path}: a part of its folder {path.parent} "
                              f"is a file, not a folder") from exc
    except PermissionError as exc:
        raise CheckpointError(f"cannot write the checkpoint {path}: no permission to create its folder "
                              f"{path.parent}") from exc
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; tensors land on ``map_location`` (default CPU)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {_checks.describe(path)}")
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the file inside it")
    if not Path(path).is_file():
        where = Path(path).parent
        why = "" if where.is_dir() else f" (its folder {where} does not exist either)"
        raise FileNotFoundError(f"no checkpoint at {path}{why}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors are long and cryptic; say what it means
        raise CheckpointError(f"{path} is not a readable cfmlib checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]})") from exc


def check_config(expected: dict, found: dict, what: str = "model") -> None:
    """Raise a ``ValueError`` listing every key where two configurations differ."""
    if expected == found:
        return
    keys = sorted(set(expected) | set(found))
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, {what} has {expected.get(k)!r}"
             for k in keys if expected.get(k) != found.get(k)]
    raise CheckpointError(f"checkpoint was written for a different {what} configuration ("
                     + "; ".join(diffs) + "); build the model with the checkpoint's config "
                     "(cfmlib.checkpoint.load_model) or start from a fresh checkpoint path")


def load_model(path, *, ema: bool = True, map_location="cpu"):
    """Rebuild the model stored in a training checkpoint (its EMA weights by default)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'model' entry); it was not written by "
                              f"cfmlib.training.train")
    config = ckpt.get("config")
    if not isinstance(config, dict) or config.get("kind") not in MODELS:
        kind = config.get("kind") if isinstance(config, dict) else None
        raise CheckpointError(f"{path} holds a model that cfmlib cannot rebuild (config {config!r}; kind {kind!r} "
                              f"is not one of {', '.join(MODELS)}); build the model yourself and load "
                              f"load_checkpoint(path)['ema'] into it with load_state_dict")
    model = build_model(dict(config))
    try:
        model.load_state_dict(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the stored weights do not fit the stored config "
                              f"({str(exc).strip().splitlines()[0][:200]})") from exc
    return model.to(map_location)

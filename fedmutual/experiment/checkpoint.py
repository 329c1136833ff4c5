"""Checkpoints: everything a run needs to continue as if it had never stopped.

A checkpoint is a directory ``<run>/checkpoints/round-NNNNNN/`` (NNNNNN = rounds completed):

- ``state.safetensors``: every tensor: model weights, optimizer buffers, the torch RNG state;
- ``state.json``: everything else: the algorithm's attribute tree (which tensor belongs where,
  optimizer hyper-parameters, plain values), the NumPy and Python RNG states, the metrics rows
  so far, the partition (each client's training and validation indices) and the next round;
- ``manifest.json``, written last: the SHA-256 of the two files.

It is written into a hidden temporary directory, flushed to disk, then renamed into place, so a
directory named ``round-*`` is always complete; the manifest catches later truncation or tampering,
and loading falls back to the previous checkpoint. Nothing is pickled: safetensors and JSON only.

Every party's state (the server's and each client's, :class:`fedmutual.protocol.State`) is captured by
:func:`fedmutual.protocol.state.dump`: modules, optimizers, tensors, NumPy arrays, lists, tuples and dicts
of them, and JSON values.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedmutual.errors import FedmutualError

FORMAT = 2  # 2: one state per party (server/, client<k>/)
PREFIX = "round-"


class CheckpointError(FedmutualError):
    """A checkpoint that cannot be written or used; the message says which and why."""


# ---------------------------------------------------------------- RNG states


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states (torch CPU and CUDA as tensors; NumPy and Python as JSON)."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(internal), gauss_py]}


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, keys, pos, has_gauss, gauss = data["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = data["python"]
    random.setstate((version, tuple(internal), gauss_py))


# ---------------------------------------------------------------- files


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    rounds_done: int
    tensors: dict[str, torch.Tensor]
    data: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write(directory: Path, rounds_done: int, tensors: dict[str, torch.Tensor], data: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically and keep only the newest ``keep``; returns its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{rounds_done:06d}"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    with open(tmp / "state.safetensors", "rb") as f:
        os.fsync(f.fileno())
    _fsync_write(tmp / "state.json", json.dumps({"format": FORMAT, "rounds_done": rounds_done, **data}).encode())
    manifest = {"format": FORMAT, "rounds_done": rounds_done,
                "sha256": {name: _sha256(tmp / name) for name in ("state.safetensors", "state.json")}}
    _fsync_write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in list_checkpoints(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def read(path: Path) -> Checkpoint:
    """Load and verify one checkpoint; raises :class:`CheckpointError` saying what is wrong with it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        sums = manifest["sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no manifest.json (it was not completely written)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path}: manifest.json is damaged") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r}; this fedmutual reads format {FORMAT}")
    for name in ("state.safetensors", "state.json"):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if _sha256(f) != sums.get(name):
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum in manifest.json (truncated or modified)")
    try:
        data = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except Exception as e:  # checksums matched, so the manifest itself was forged to fit damaged files
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:100]})") from None
    return Checkpoint(path, int(data["rounds_done"]), tensors, data)


def latest(directory: Path, log: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint that verifies, logging each damaged one skipped; None when there is none at all.

    Raises :class:`CheckpointError` when checkpoints exist but none is usable.
    """
    problems = []
    for path in list_checkpoints(directory):
        try:
            return read(path)
        except CheckpointError as e:
            problems.append(str(e))
            log(f"fedmutual: {e}; falling back to the previous checkpoint")
    if problems:
        raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
    return None


def remove_partial(directory: Path) -> None:
    """Delete temporary directories left by a checkpoint write that was interrupted."""
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(f".{PREFIX}") and ".tmp-" in p.name:
                shutil.rmtree(p, ignore_errors=True)

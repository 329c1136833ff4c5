"""A node's own copy of its client's state, on its disk, per run and per round.

After every request it handles, a node writes its client's state as ``r<round>-s<session>.safetensors`` plus a JSON
file (written last, so a state is complete once its JSON exists; both by atomic rename). A request of round t in
session s continues from the state of (t, s) when there is one (a second request in the same round), and otherwise
from the newest state of an earlier round, so that:

- a node restarted mid-run continues from its last state on disk (rounds it missed leave it where it was);
- a resumed run (a new session, from the server's checkpoint after round t) first drops the states of rounds from t
  on that the abandoned session left, so every client goes back to where the checkpoint was.

Only the states a resume can still need are kept (``keep`` rounds).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmutual.errors import FedmutualError

_NAME = re.compile(r"^r(-?\d+)-s(\d+)\.json$")


class StoreError(FedmutualError):
    """A node's state on disk that cannot be read."""


class StateStore:
    """Client states of one run on one node, in ``directory``."""

    def __init__(self, directory: Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = max(2, int(keep))
        self.dir.mkdir(parents=True, exist_ok=True)

    def _entries(self) -> list[tuple[int, int, Path]]:
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(out)

    def find(self, t: int, session: int) -> tuple[int, int] | None:
        """Which stored state a request of round ``t`` in ``session`` continues from (None: the initial state).

        The first request of a newer session drops what older sessions stored for rounds t and later."""
        entries = self._entries()
        if entries and session > max(s for _, s, _ in entries):
            for r, s, p in entries:
                if r >= t:
                    self._remove(p)
            entries = self._entries()
        if any(r == t and s == session for r, s, _ in entries):
            return t, session
        earlier = [(r, s) for r, s, _ in entries if r < t]
        return max(earlier) if earlier else None

    def read(self, key: tuple[int, int]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The tensors and JSON tree of a stored state, checked against the digest its JSON records."""
        r, s = key
        meta_path = self.dir / f"r{r}-s{s}.json"
        data_path = self.dir / f"r{r}-s{s}.safetensors"
        try:
            meta = json.loads(meta_path.read_text())
            data = data_path.read_bytes()
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"the client state {meta_path} cannot be read ({e}); remove {self.dir} to start this client afresh") from None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise StoreError(f"the client state {data_path} does not match its digest; remove {self.dir} to start this client afresh")
        return st_load(data), meta["tree"]

    def write(self, t: int, session: int, tensors: dict[str, torch.Tensor], tree: dict[str, Any]) -> None:
        """Store the state after a request of round ``t``; drop states no resume can need any more."""
        data = st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
        base = self.dir / f"r{t}-s{session}"
        _atomic(base.with_suffix(".safetensors"), data)
        _atomic(base.with_suffix(".json"), json.dumps({"round": t, "session": session, "sha256": hashlib.sha256(data).hexdigest(),
                                                       "tree": tree}).encode())
        for r, s, p in self._entries():
            if r < t - self.keep or (r == t and s < session):
                self._remove(p)

    def _remove(self, meta: Path) -> None:
        meta.unlink(missing_ok=True)  # the JSON first: without it the state no longer counts
        meta.with_suffix(".safetensors").unlink(missing_ok=True)


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

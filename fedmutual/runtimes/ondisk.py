"""The in-process runtime with the clients' states on disk: for federations whose states do not fit in memory.

Each client's state lives in a safetensors file (and a JSON tree) in a directory of its own between rounds. A round
opens the states of the clients it reaches (its participants, and the coordinator), runs exactly what the in-process
runtime runs on them, and writes them back when the round ends; only those states are in memory meanwhile. With
10,000 clients of which 1% take part per round, a round holds 100 states. Evaluation and checkpoints read the states
they need from the files. A state is rebuilt onto a freshly initialized state of its client (its models and
optimizers), as the isolation runtime does, so the metrics are those of :class:`~fedmutual.runtimes.inprocess.InProcess`
(tested).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from fedmutual.protocol import Algorithm, ClientEnv, Round, State
from fedmutual.protocol.state import dump, load
from fedmutual.runtimes.inprocess import InProcess


class OnDisk(InProcess):
    """:class:`InProcess` with every client's state in ``directory`` (a temporary one by default) between rounds."""

    def __init__(self, alg: Algorithm, envs: Sequence[ClientEnv], log: Callable[[str], None] | None = None,
                 engine: str | None = None, record: bool = False, directory: str | Path | None = None):
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix="fedmutual-states-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.dir, True)
        else:
            self.dir = Path(directory)
            self.dir.mkdir(parents=True, exist_ok=True)
        self._open: dict[int, State] = {}
        super().__init__(alg, envs, log, engine, record)

    # ------------------------------------------------------------------ the files

    def _path(self, k: int) -> Path:
        return self.dir / f"client{k}.safetensors"

    def _store(self, k: int, state: State) -> None:
        tensors, tree = dump(state)
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(self._path(k)),
                  metadata={"tree": json.dumps(tree)})

    def _read(self, k: int) -> State:
        from safetensors import safe_open

        with safe_open(str(self._path(k)), framework="pt") as f:
            tree = json.loads((f.metadata() or {})["tree"])
        tensors = {n: t.to(self.alg.run.device) for n, t in load_file(str(self._path(k))).items()}
        state = self.alg.init_client(self.envs[k])
        load(state, tensors, tree, self.alg.run.new_model)
        return state

    def _get(self, k: int) -> State:
        """Client k's state, opened for the rest of the round."""
        if k not in self._open:
            self._open[k] = self._read(k)
        return self._open[k]

    def _close(self) -> None:
        """Write every state the round opened back to its file, and let it go."""
        for k, state in self._open.items():
            self._store(k, state)
        self._open.clear()

    # ------------------------------------------------------------------ the runtime's hooks

    def _init_client(self, env: ClientEnv) -> State:
        self._store(env.k, self.alg.init_client(env))
        return State()  # a placeholder: the state is in the file

    def client_state(self, k: int) -> State:
        return self._open[k] if k in self._open else self._read(k)

    def _handle(self, k: int, fn: Callable[[State], Any]) -> Any:
        return fn(self._get(k))

    def _finish(self, k: int, fn: Callable[[State], Any] | None) -> Any:
        return fn(self._get(k)) if fn is not None else None

    def _coordinate(self, gen_of: Callable[[State], Round]) -> dict[str, float]:
        state = self.server if self.coord is None else self._get(self.coord)
        try:
            return self._drive(gen_of(state))
        finally:
            self._close()

    def load(self, tensors: dict[str, torch.Tensor], tree: dict[str, Any]) -> None:
        load(self.server, tensors, tree["server"], self.alg.run.new_model, "server/")
        for k in range(len(self.envs)):
            state = self.alg.init_client(self.envs[k])
            load(state, tensors, tree[f"client{k}"], self.alg.run.new_model, f"client{k}/")
            self._store(k, state)

    def bytes_on_disk(self) -> int:
        """The size of the clients' state files."""
        return sum(p.stat().st_size for p in self.dir.glob("client*.safetensors"))

"""Peer processes on localhost, for tests (this is not a test module).

Each peer is ``python -m fedmutual peer`` in a process group of its own, with its log under ``workdir/logs``;
certificates come from scripts/peer-certs.sh, ports are free ones, and ``close()`` ends every process started::

    with PeerCluster(tmp_path, cfg, n=4) as peers:
        for k in range(4):
            peers.start(k)
        assert all(peers.wait(k, 300) == 0 for k in range(4))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from .cluster import REPO_ROOT, _die_with_parent, free_port

CERTS = REPO_ROOT / "scripts" / "peer-certs.sh"


class PeerCluster:
    def __init__(self, workdir: Path, config: dict[str, Any], n: int, federation: str = "fed", *,
                 timeout: float = 60.0, round_timeout: float = 120.0, wait: float = 120.0):
        self.workdir = Path(workdir).resolve()
        self.n, self.federation = n, federation
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        certs = self.workdir / "certs"
        subprocess.run(["sh", str(CERTS), str(certs), str(n)], check=True, capture_output=True)
        self.ports = [free_port() for _ in range(n)]
        lines = [f'federation = "{federation}"', 'ca = "certs/ca.crt"', ""]
        for k, port in enumerate(self.ports):
            lines += ["[[peer]]", f"id = {k}", f'address = "127.0.0.1:{port}"', f'cert = "certs/peer{k}.crt"',
                      f'key = "certs/peer{k}.key"', ""]
        self.peers_toml = self.workdir / "peers.toml"
        self.peers_toml.write_text("\n".join(lines))
        self.config = self.workdir / "config.json"
        self.config.write_text(json.dumps(config))
        self.out = Path(config["out"])
        self.args = ["--timeout", str(timeout), "--round-timeout", str(round_timeout), "--wait", str(wait)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}

    def dir(self, k: int) -> Path:
        """Peer k's run directory."""
        return self.out / self.federation / f"peer{k}"

    def start(self, k: int) -> None:
        if k in self.procs and self.procs[k].poll() is None:
            raise RuntimeError(f"peer {k} is already running")
        log = self._logs.get(k) or open(self.logs / f"peer{k}.log", "ab")
        self._logs[k] = log
        log.write(f"\n===== starting peer {k}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "fedmutual", "peer", "--config", str(self.config), "--peers", str(self.peers_toml),
               "--id", str(k), *self.args]
        self.procs[k] = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent())

    def kill(self, k: int) -> None:
        """SIGKILL peer k (as a machine that fails)."""
        proc = self.procs[k]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        self._logs[k].write(b"\n===== SIGKILLed\n")
        self._logs[k].flush()

    def wait(self, k: int, timeout: float) -> int:
        try:
            return self.procs[k].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"peer {k} still running after {timeout:.0f} s\n{self.tail(k)}") from None

    def wait_rows(self, k: int, rows: int, timeout: float) -> None:
        """Until peer k has written ``rows`` rows of metrics."""
        path = self.dir(k) / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while not (path.is_file() and len(path.read_text().splitlines()) >= rows):
            if time.monotonic() > deadline or self.procs[k].poll() is not None:
                raise RuntimeError(f"peer {k} wrote fewer than {rows} rows\n{self.tail(k)}")
            time.sleep(0.2)

    def log(self, k: int) -> str:
        return (self.logs / f"peer{k}.log").read_text(errors="replace")

    def tail(self, k: int, lines: int = 40) -> str:
        return f"----- peer{k}.log:\n" + "\n".join(self.log(k).splitlines()[-lines:])

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for f in self._logs.values():
            f.close()

    def __enter__(self) -> "PeerCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

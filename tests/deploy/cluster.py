"""A real Flower 1.42 deployment on localhost, for tests (this is not a test module).

One SuperLink and N SuperNodes run as separate processes, with TLS and SuperNode
authentication on by default, and Flower Apps are submitted with the ``flwr`` CLI,
exactly as an operator would::

    with Federation(tmp_path, nodes=3) as fed:
        fed.start_superlink()
        for i in range(3):
            fed.start_supernode(i, {"partition-id": i})
        run_id = fed.submit(app_dir, {"rounds": 2})
        fed.wait(run_id, timeout=120)

How flwr 1.42 is driven (read from its source, see tests/deploy/demo_app/prove.py):

* SuperLink: ``flower-superlink --ssl-certfile server.pem --ssl-keyfile server.key
  --ssl-ca-certfile ca.crt --enable-supernode-auth --host 127.0.0.1 --port P
  --database :flwr-in-memory: --disable-runtime-dependency-installation``.
  In 1.42 ONE port (FastAPI/uvicorn) serves the Fleet, Control and Runtime APIs.
* SuperNode keys are registered on the SuperLink with
  ``flwr supernode register node_i.pub <connection>`` (the Control API); the node
  then starts with ``--auth-supernode-private-key node_i`` (an OpenSSH-format EC
  key) and gets the node id that was assigned at registration.
* SuperNode: ``flower-supernode --superlink 127.0.0.1:P --root-certificates ca.crt
  --auth-supernode-private-key node_i --node-config "k=v k2='s'" --port Q``;
  ``--port`` is its local Runtime (ClientAppIo) HTTP API.
* The ``flwr`` CLI takes the SuperLink address and CA from a named connection in
  ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``); the app's pyproject.toml is
  not touched (a legacy ``[tool.flwr.federations]`` section there would be
  migrated into that file, and commented out, by the 1.42 CLI).

Every service gets its own process group and log file under ``workdir/logs``; all
processes also carry a marker environment variable, so ``close()`` finds and ends
the ones Flower starts in a new session of their own (the SuperLink starts its
``flower-superexec`` with ``start_new_session=True``).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import IO, Any, Mapping

__all__ = ["Federation", "free_port"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CERTS_SCRIPT = REPO_ROOT / "scripts" / "flower-certs.sh"
CONNECTION = "harness"  # name of the SuperLink connection in $FLWR_HOME/config.toml
MARKER = "FEDMUTUAL_FLOWER_CLUSTER"  # env var carried by every process we start
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_LIVE: "weakref.WeakSet[Federation]" = weakref.WeakSet()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (the OS picks it for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """The executable ``name`` next to this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _toml_value(v: str | int | float | bool) -> str:
    """One value in the ``k=v`` syntax that flwr's parse_config_args accepts."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if "\n" in v or "\r" in v:
        raise ValueError(f"config string with a line break cannot be passed: {v!r}")
    if "'" not in v:
        return f"'{v}'"  # TOML literal string: no escapes needed
    if '"' not in v and "\\" not in v:
        return f'"{v}"'
    raise ValueError(f"config string with both quote kinds cannot be passed: {v!r}")


def _die_with_parent() -> Any:
    """A preexec_fn making the child get SIGKILL when its parent thread dies (Linux).

    So the services go even if the test process itself is SIGKILLed; their own
    children follow (flower-superexec / flwr-*app watch their --parent-pid).
    Only used from the main thread: PR_SET_PDEATHSIG fires when the *thread*
    that forked exits.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # parent died before prctl took effect
            os._exit(1)

    return preexec


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, state) for every process (Linux /proc)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _tagged(tag: str) -> set[int]:
    """Live (non-zombie) processes whose environment carries MARKER=tag."""
    needle = f"{MARKER}={tag}".encode()
    found = set()
    for pid, (_, _, state) in _proc_table().items():
        if state == "Z" or pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(pid)
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    state = _proc_table().get(pid)
    return state is not None and state[2] != "Z"


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Federation:
    """One SuperLink and ``nodes`` SuperNodes on localhost; a context manager.

    ``workdir`` receives ``certs/`` (from scripts/flower-certs.sh), ``flwr-home/``
    (FLWR_HOME of every process, including the CLI's ``config.toml``), ``logs/``
    (``superlink.log``, ``supernode<i>.log``, ``cli.log``) and ``run-configs/``.
    """

    def __init__(
        self,
        workdir: Path,
        nodes: int,
        tls: bool = True,
        auth: bool = True,
        *,
        superexec_poll_interval: float | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS in flwr 1.42")
        self.workdir = Path(workdir).resolve()
        self.nodes = nodes
        self.tls = tls
        self.auth = auth
        self.startup_timeout = startup_timeout
        self.tag = uuid.uuid4().hex
        self.home = self.workdir / "flwr-home"
        self.certs = self.workdir / "certs"
        self.logs = self.workdir / "logs"
        for d in (self.home, self.logs, self.workdir / "run-configs"):
            d.mkdir(parents=True, exist_ok=True)

        self.superlink_port = free_port()
        self.supernode_ports = [free_port() for _ in range(nodes)]
        self.address = f"127.0.0.1:{self.superlink_port}"
        self.node_ids: dict[int, int] = {}  # node index -> node id (as last seen)
        self._registered: dict[int, int] = {}  # node index -> id from registration
        self._killed: set[int] = set()  # nodes SIGKILLed and not yet restarted
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logfiles: dict[str, IO[bytes]] = {}
        self._closed = False
        self._runs = 0

        self.env = self._make_env(superexec_poll_interval, env)
        if tls:
            subprocess.run(
                ["sh", str(CERTS_SCRIPT), str(self.certs), str(nodes)],
                check=True, capture_output=True, env={**self.env, "PYTHON": sys.executable},
            )
        self._write_cli_config()
        _LIVE.add(self)

    # ------------------------------------------------------------------ setup
    def _make_env(
        self, poll: float | None, extra: Mapping[str, str] | None
    ) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith("FLWR_") and k not in ("FORCE_COLOR", MARKER)
        }
        env.update({
            "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",  # flwr.supercore.update_check
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            MARKER: self.tag,
        })
        if poll is not None:  # default 1 s, read by every flower-superexec
            env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll)
        env.update(extra or {})
        return env

    def _write_cli_config(self) -> None:
        lines = [
            "[superlink]", f'default = "{CONNECTION}"', "",
            f"[superlink.{CONNECTION}]", f'address = "{self.address}"',
        ]
        if self.tls:
            lines.append(f"root-certificates = {json.dumps(str(self.certs / 'ca.crt'))}")
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # --------------------------------------------------------------- services
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        if self._closed:
            raise RuntimeError("Federation is closed")
        old = self._procs.get(name)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{name} is already running (pid {old.pid})")
        logfile = self._logfiles.get(name)
        if logfile is None:
            logfile = self._logfiles[name] = open(self.logs / f"{name}.log", "ab")
        logfile.write(f"\n===== harness: starting {name}: {' '.join(cmd)}\n".encode())
        logfile.flush()
        proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        self._procs[name] = proc
        return proc

    def _wait_port(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode} before its port "
                    f"{port} opened\n{self._tail(name)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name}: port {port} not open after {timeout:.0f}s\n{self._tail(name)}")
            time.sleep(0.1)

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until its (single) API port accepts TCP."""
        cmd = [_bin("flower-superlink")]
        if self.tls:
            cmd += ["--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"),
                    "--ssl-ca-certfile", str(self.certs / "ca.crt")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.superlink_port),
                "--database", ":flwr-in-memory:",
                "--disable-runtime-dependency-installation"]
        self._spawn("superlink", cmd)
        self._wait_port("superlink", self.superlink_port, self.startup_timeout)

    def register_supernode(self, i: int) -> int:
        """Register node i's public key on the SuperLink (auth mode); return the node id."""
        if i not in self._registered:
            out = self._flwr("supernode", "register", str(self.certs / f"node_{i}.pub"),
                             CONNECTION, json_out=True)
            self._registered[i] = int(out["node-id"])
        return self._registered[i]

    def start_supernode(self, i: int, node_config: Mapping[str, str | int | float]) -> None:
        """Start SuperNode i (key pair i) and wait until the SuperLink has activated it."""
        self.start_supernodes({i: node_config})

    def start_supernodes(self, configs: Mapping[int, Mapping[str, str | int | float]]) -> None:
        """Start several SuperNodes ({index: node_config}) at once, then wait for all.

        A node restarted after ``kill_supernode`` keeps its key, hence its node id,
        but the SuperLink refuses to activate it while it still counts as online
        (until 2 x 30 s heartbeat interval after its last heartbeat; the node then
        exits with code 305, "Failed to activate SuperNode"), so such a node is
        relaunched every few seconds until activation succeeds.
        """
        if "superlink" not in self._procs:
            raise RuntimeError("start_superlink() first")
        # HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL = 60 s, plus slack
        deadlines = {i: time.monotonic() + self.startup_timeout
                     + (75.0 if i in self._killed else 0.0) for i in configs}
        self._wait_offline([i for i in configs if i in self._killed],
                           max(deadlines.values()))
        offsets = {i: self._launch_supernode(i, cfg) for i, cfg in configs.items()}
        for i, offset in offsets.items():
            deadline = deadlines[i]
            while not self._await_supernode(i, offset, deadline):
                time.sleep(3.0)
                offset = self._launch_supernode(i, configs[i])
            self._killed.discard(i)

    def _wait_offline(self, indices: list[int], deadline: float) -> None:
        """Wait until the SuperLink no longer counts these (killed) nodes as online."""
        ids = {str(self.node_ids[i]) for i in indices if i in self.node_ids}
        while ids and time.monotonic() < deadline:
            online = {n["node-id"] for n in self.list_nodes() if n["status"] == "online"}
            if not ids & online:
                return
            time.sleep(4.0)

    def _launch_supernode(self, i: int, node_config: Mapping[str, str | int | float]) -> int:
        if not 0 <= i < self.nodes:
            raise IndexError(f"node index {i} not in 0..{self.nodes - 1}")
        name = f"supernode{i}"
        cmd = [_bin("flower-supernode"), "--superlink", self.address]
        if self.tls:
            cmd += ["--root-certificates", str(self.certs / "ca.crt")]
        else:
            cmd += ["--insecure"]
        if self.auth:
            self.register_supernode(i)
            cmd += ["--auth-supernode-private-key", str(self.certs / f"node_{i}")]
        if node_config:
            cmd += ["--node-config",
                    " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())]
        cmd += ["--host", "127.0.0.1", "--port", str(self.supernode_ports[i])]
        log_path = self.logs / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self._spawn(name, cmd)
        return offset

    def _await_supernode(self, i: int, offset: int, deadline: float) -> bool:
        """True once node i is activated; False if the SuperLink refused to activate it."""
        name = f"supernode{i}"
        # Its Runtime API port opens first; "SuperNode ID: <id>" follows ActivateNode.
        while True:
            with open(self.logs / f"{name}.log", "rb") as f:
                f.seek(offset)
                text = f.read()
            m = re.search(rb"SuperNode ID: (\d+)", text)
            if m:
                self._wait_port(name, self.supernode_ports[i], self.startup_timeout)
                self.node_ids[i] = int(m.group(1))
                return True
            proc = self._procs[name]
            if proc.poll() is not None:
                if b"Failed to activate SuperNode" in text and time.monotonic() < deadline:
                    return False
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}\n{self._tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not connected in time\n{self._tail(name)}")
            time.sleep(0.1)

    def _group_and_descendants(self, pid: int) -> set[int]:
        table = _proc_table()
        found = {p for p, (_, pgid, _) in table.items() if pgid == pid} | {pid}
        grew = True
        while grew:
            grew = False
            for p, (ppid, _, _) in table.items():
                if ppid in found and p not in found:
                    found.add(p)
                    grew = True
        return found

    def kill_supernode(self, i: int) -> None:
        """SIGKILL SuperNode i with its flower-superexec and flwr-clientapp children."""
        name = f"supernode{i}"
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"{name} is not running")
        victims = self._group_and_descendants(proc.pid)
        _signal(proc.pid, signal.SIGKILL, group=True)
        for pid in victims:
            _signal(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in victims) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._killed.add(i)
        self._logfiles[name].write(b"\n===== harness: SIGKILLed\n")
        self._logfiles[name].flush()

    # -------------------------------------------------------------------- CLI
    def _flwr(self, *args: str, json_out: bool, timeout: float = 120.0) -> Any:
        cmd = [_bin("flwr"), *args] + (["--format", "json"] if json_out else [])
        t = time.monotonic()
        res = subprocess.run(cmd, cwd=self.workdir, env=self.env, capture_output=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        out, err = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
        with open(self.logs / "cli.log", "a", encoding="utf-8") as f:
            f.write(f"\n$ {' '.join(cmd)}   # rc={res.returncode} "
                    f"{time.monotonic() - t:.2f}s\n{out}{err}")
        if not json_out:
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed (rc={res.returncode}):\n{out}{err}")
            return _ANSI.sub("", out)
        try:
            data = json.loads(out[out.index("{"): out.rindex("}") + 1])
        except ValueError:
            raise RuntimeError(
                f"{' '.join(cmd)}: no JSON (rc={res.returncode}):\n{out}{err}") from None
        # The 1.42 CLI exits 0 with {"success": false, "error-message": ...} on errors.
        if not data.get("success", False):
            raise RuntimeError(
                f"{' '.join(cmd)} failed: {data.get('error-message', data)}\n{err}")
        return data

    def submit(
        self, app_dir: Path, run_config: Mapping[str, str | int | float | bool] | None = None
    ) -> int:
        """``flwr run`` the app against this SuperLink; return the run id.

        ``run_config`` goes through a TOML file (``--run-config file.toml``), so any
        string (long JSON included) arrives intact and values keep their TOML type
        (str/int/float/bool; not checked against the defaults' types).  Every key
        must be declared in the app's ``[tool.flwr.app.config]``: flwr 1.42 rejects
        the submission otherwise ("[code: 15] Invalid run configuration.").
        """
        args = ["run", str(Path(app_dir).resolve()), CONNECTION]
        if run_config:
            import tomli_w  # a dependency of flwr

            self._runs += 1
            path = self.workdir / "run-configs" / f"run-{self._runs}.toml"
            path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
            args += ["--run-config", str(path)]
        out = self._flwr(*args, json_out=True)
        return int(out["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """The run's entry from ``flwr ls --run-id``, plus ``state``/``sub_status``.

        ``status`` is e.g. ``"running"`` or ``"finished:completed"`` (also
        ``finished:failed`` / ``finished:stopped``); ``details`` the reason.
        """
        out = self._flwr("ls", CONNECTION, "--run-id", str(run_id), json_out=True)
        run = dict(out["runs"][0])
        state, _, sub = str(run["status"]).partition(":")
        run.update({"run_id": int(run["run-id"]), "state": state, "sub_status": sub,
                    "details": run.get("status-details", "")})
        return run

    def stop(self, run_id: int) -> None:
        """``flwr stop`` the run."""
        self._flwr("stop", str(run_id), CONNECTION, json_out=True)

    def app_log(self, run_id: int) -> str:
        """The ServerApp's own output (prints, tracebacks): ``flwr log RUN --show``.

        In 1.42 the SuperExec starts flwr-serverapp with stdout/stderr sent to
        /dev/null; its output is only shipped to the SuperLink and read back here.
        """
        return str(self._flwr("log", str(run_id), CONNECTION, "--show", json_out=False,
                              timeout=60))

    def list_nodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls``: node-id, status (registered/online/offline), ..."""
        return list(self._flwr("supernode", "ls", CONNECTION, json_out=True)["nodes"])

    def wait(self, run_id: int, timeout: float, poll: float = 3.0) -> dict[str, Any]:
        """Wait until the run finishes; return its status, raise if it did not complete.

        ``flwr ls`` costs ~1 s of CPU, so it is called every ``poll`` seconds, and
        at once when the SuperLink logs that a task of this run finished.
        """
        deadline = time.monotonic() + timeout
        hint = re.compile(rf"Finished task \d+ of run {run_id}\b".encode())
        log_path = self.logs / "superlink.log"
        offset, tail = 0, b""
        next_poll = time.monotonic() + 1.0
        last: dict[str, Any] = {}
        while True:
            with open(log_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            tail += chunk
            hit = hint.search(tail) is not None
            tail = tail[tail.rfind(b"\n") + 1 :]  # keep a partial last line only
            now = time.monotonic()
            if hit or now >= next_poll:
                last = self.status(run_id)
                if last["state"] == "finished":
                    if last["sub_status"] == "completed":
                        return last
                    raise RuntimeError(self.report(
                        run_id, f"run {run_id} ended {last['status']}: {last['details']}"))
                next_poll = time.monotonic() + poll
            if now > deadline:
                try:
                    self.stop(run_id)
                except Exception as err:  # noqa: BLE001 - report, do not mask
                    last["stop_error"] = str(err)
                raise RuntimeError(self.report(
                    run_id, f"run {run_id} not finished after {timeout:.0f}s "
                            f"(last status {last.get('status')}); stopped it"))
            time.sleep(0.25)

    def report(self, run_id: int | None, headline: str, lines: int = 60) -> str:
        """headline + ServerApp log (if a run) + the last ``lines`` of every service log."""
        parts = [headline]
        if run_id is not None:
            try:
                parts.append("----- ServerApp log (flwr log):\n" + self.app_log(run_id))
            except Exception as err:  # noqa: BLE001
                parts.append(f"----- ServerApp log unavailable: {err}")
        names = sorted(self._logfiles) + (["cli"] if (self.logs / "cli.log").exists() else [])
        parts += [self._tail(name, lines) for name in names]
        return "\n".join(parts)

    # ------------------------------------------------------------------- logs
    def log(self, name: str) -> str:
        """Text (ANSI colours removed) of one service's log: superlink, supernode0, cli."""
        path = self.logs / f"{name}.log"
        return _ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))

    def _tail(self, name: str, lines: int = 60) -> str:
        try:
            text = self.log(name).splitlines()[-lines:]
        except OSError:
            text = ["<no log>"]
        return f"----- last {lines} lines of {name}.log:\n" + "\n".join(text)

    # --------------------------------------------------------------- shutdown
    def live_processes(self) -> dict[int, str]:
        """pid -> command line of every live process this Federation started."""
        out = {}
        for pid in _tagged(self.tag):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
        return out

    def _victims(self) -> set[int]:
        """Live processes of ours: tagged ones, our process groups, our live trees."""
        table = _proc_table()
        leaders = {proc.pid for proc in self._procs.values() if proc.poll() is None}
        found = {p for p, (_, pgid, st) in table.items() if pgid in leaders and st != "Z"}
        found |= leaders
        grew = True
        while grew:  # descendants of live leaders (orphans are found by their tag)
            grew = False
            for p, (ppid, _, st) in table.items():
                if ppid in found and p not in found and st != "Z":
                    found.add(p)
                    grew = True
        return found | _tagged(self.tag)

    def close(self, grace: float = 5.0) -> None:
        """End every process started (SIGTERM, then SIGKILL after ``grace`` s). Idempotent."""
        if self._closed:
            return
        self._closed = True
        procs = list(self._procs.values())
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            for proc in procs:
                if proc.poll() is None:
                    _signal(proc.pid, sig, group=True)
            for pid in self._victims():
                _signal(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                for proc in procs:
                    proc.poll()
                if not self._victims():
                    break
                time.sleep(0.1)
            else:
                continue
            break
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for f in self._logfiles.values():
            f.close()
        _LIVE.discard(self)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is idempotent
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


@atexit.register
def _close_all() -> None:
    for fed in list(_LIVE):
        fed.close()

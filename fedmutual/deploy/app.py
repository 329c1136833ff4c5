"""``fedmutual flower app``: a runnable Flower app directory for a fedmutual config.

The directory holds:

- ``pyproject.toml``: the app (``[tool.flwr.app]``): its components are fedmutual's ServerApp and ClientApp, and its
  run config (``[tool.flwr.app.config]``) carries the fedmutual config as JSON plus the deployment's settings
  (see :mod:`fedmutual.deploy.flower`);
- ``fedmutual_app/``: the two component modules, which only name fedmutual's apps (every machine has fedmutual
  installed, with the ``flower`` extra);
- ``superlink.toml``: the SuperLink connection for the ``flwr`` command line (address, and the CA certificate
  for TLS), to add to ``$FLWR_HOME/config.toml`` (default ``~/.flwr/config.toml``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmutual.config import Config
from fedmutual.errors import ConfigError

CONNECTION = "fedmutual"

_RUN_DEFAULTS: dict[str, Any] = {"config": "", "out": "", "name": "", "resume": "", "timeout": 600.0, "wait": 600.0,
                              "record-messages": False}

_COMMENTS = {
    "config": "the fedmutual config (JSON), as `fedmutual flower app` wrote it",
    "out": "parent directory of run directories on the SuperLink's machine (empty: the config's out)",
    "name": "run directory name (empty: derived from the config and the time)",
    "resume": "a run directory to continue from its last checkpoint (empty: a new run)",
    "timeout": "deadline of one exchange with the SuperNodes, in seconds",
    "wait": "seconds to wait for every client's SuperNode to connect",
    "record-messages": "write every message's sender, receiver, bytes and tensor shapes to the run's messages.jsonl",
}


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string literal is a valid TOML basic string


def write_app(cfg: Config, directory: str | Path, superlink: str = "127.0.0.1:9093", root_certificates: str | None = None,
              insecure: bool = False) -> Path:
    """Write the Flower app for ``cfg`` into ``directory`` (created; an existing app there is replaced)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{d} is a file; give a directory for the Flower app")
    if d.is_dir() and any(d.iterdir()) and not (d / "fedmutual_app").is_dir():
        raise ConfigError(f"{d} is not empty and holds no fedmutual app; give a new or empty directory")
    if root_certificates is None and not insecure:
        raise ConfigError("give --root-certificates CA.crt (the SuperLink's TLS certificate authority), or --insecure for a trial without TLS")
    pkg = d / "fedmutual_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""A Flower app that runs a fedmutual experiment (written by `fedmutual flower app`)."""\n')
    (pkg / "server.py").write_text('"""The ServerApp: the coordinator\'s rounds, the run directory."""\n\n'
                                   "from fedmutual.deploy.flower import server_app as app\n\n__all__ = [\"app\"]\n")
    (pkg / "client.py").write_text('"""The ClientApp: the algorithm\'s client handlers, each client\'s state on its node."""\n\n'
                                   "from fedmutual.deploy.flower import client_app as app\n\n__all__ = [\"app\"]\n")
    rc = {**_RUN_DEFAULTS, "config": json.dumps(cfg.to_dict(), sort_keys=True)}
    name = "fedmutual-" + "".join(c if c.isalnum() else "-" for c in cfg.algorithm.lower()).strip("-")
    lines = [
        "# A Flower app for one fedmutual experiment, written by `fedmutual flower app`.",
        "# Every machine needs fedmutual with its flower extra: pip install \"fedmutual[flower]\".",
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f"name = {_toml(name)}", 'version = "1.0.0"',
        f"description = {_toml(f'fedmutual {cfg.algorithm} on {cfg.dataset}, {cfg.clients} clients, {cfg.rounds} rounds')}",
        'license = "Apache-2.0"', 'dependencies = ["fedmutual[flower]"]', "",
        "[tool.hatch.build.targets.wheel]", 'packages = ["fedmutual_app"]', "",
        "[tool.flwr.app]", 'publisher = "fedmutual"', "",
        "[tool.flwr.app.components]", 'serverapp = "fedmutual_app.server:app"', 'clientapp = "fedmutual_app.client:app"', "",
        "[tool.flwr.app.config]",
    ]
    for key, value in rc.items():
        lines += [f"# {_COMMENTS[key]}", f"{key} = {_toml(value)}"]
    (d / "pyproject.toml").write_text("\n".join(lines) + "\n")
    conn = [f"# The SuperLink connection for `flwr run {d} {CONNECTION}`: add it to $FLWR_HOME/config.toml (default ~/.flwr/config.toml).",
            f"[superlink.{CONNECTION}]", f"address = {_toml(superlink)}"]
    conn.append("insecure = true" if insecure else f"root-certificates = {_toml(str(Path(root_certificates).resolve()))}")  # type: ignore[arg-type]
    (d / "superlink.toml").write_text("\n".join(conn) + "\n")
    return d

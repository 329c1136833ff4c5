"""fedmutual's Flower apps: the ServerApp drives the coordinator's rounds, the ClientApp runs the client handlers.

A Flower app for a fedmutual config is written by ``fedmutual flower app --config X.toml DIR`` (:func:`write_app`);
its ``pyproject.toml`` names :data:`server_app` and :data:`client_app` and carries the config as the run config
``config`` (JSON). The ServerApp runs the experiment as :func:`fedmutual.experiment.runner.run` does, on the
:class:`~fedmutual.runtimes.remote.Remote` runtime over the grid, and writes the same run directory.

Run config (``flwr run DIR --run-config "key=value ..."``):

- ``config``: the fedmutual config as JSON (written by ``fedmutual flower app``);
- ``out``: the parent directory of run directories on the SuperLink's machine (default: the config's ``out``);
- ``name``: the run directory's name (default: derived from the config and the time);
- ``resume``: a run directory to continue from its last checkpoint (its own ``config.json`` applies);
- ``timeout``: the deadline of one exchange, in seconds; ``wait``: how long to wait for every client's SuperNode;
- ``record-messages``: write every message's sender, receiver, bytes and tensor shapes to ``messages.jsonl``.

Node config (``flower-supernode --node-config "partition-id=0 num-partitions=3"``):

- ``partition-id``: the client this node hosts; ``num-partitions``: the run's number of clients;
- ``data-dir``: a dataset directory of the node's own (default: the simulation's partition of the run's dataset);
- ``state-dir``: where the node keeps its client's state per run (default ``~/.fedmutual/node-state``).
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmutual.config import Config, validate
from fedmutual.deploy.node import Node
from fedmutual.errors import ConfigError
from fedmutual.runtimes.flower import GridTransport, from_record, to_record
from fedmutual.runtimes.remote import Remote

DEFAULT_STATE_DIR = "~/.fedmutual/node-state"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def app_config(rc: Mapping[str, Any]) -> Config:
    """The fedmutual config a run config carries, with its ``out`` and ``name`` overrides."""
    if not rc.get("config"):
        raise ConfigError("the run config has no 'config'; write the app with `fedmutual flower app --config X.toml DIR`")
    raw = json.loads(str(rc["config"]))
    for key in ("out", "name"):
        if rc.get(key):
            raw[key] = str(rc[key])
    return validate(raw)


def serve(grid: Any, rc: Mapping[str, Any]) -> None:
    """The ServerApp's work: run (or resume) the experiment with every client on its SuperNode."""
    from fedmutual.config import load_file
    from fedmutual.experiment.runner import resume, run

    cfg = app_config(rc)
    factory = partial(Remote, transport=GridTransport(grid), timeout=float(rc.get("timeout", 600.0)),
                      wait=float(rc.get("wait", 600.0)), record=bool(rc.get("record-messages", False)))
    if rc.get("resume"):
        run_dir = Path(str(rc["resume"]))
        if (run_dir / "config.json").is_file():
            theirs = validate(load_file(run_dir / "config.json")).to_dict()
            ours = cfg.to_dict()
            changed = sorted(k for k in set(theirs) | set(ours) if k not in ("out", "name") and theirs.get(k) != ours.get(k))
            if changed:
                raise ConfigError(f"resume {run_dir}: the app's config differs from the run's config.json in {', '.join(changed)}; "
                                  "the SuperNodes build their data from the app's config, so resume with the app that started the run")
        resume(run_dir, runtime=factory)
        return
    run(cfg, runtime=factory)


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    serve(grid, context.run_config)


def node_for(node_config: Mapping[str, Any], rc: Mapping[str, Any]) -> Node:
    """This SuperNode's party of the run: the client its node config names, over its data."""
    for key in ("partition-id", "num-partitions"):
        if key not in node_config:
            raise ConfigError(f"the SuperNode's node config has no {key!r}; start it with "
                              "--node-config \"partition-id=K num-partitions=N\"")
    cfg = app_config(rc)
    state_dir = Path(os.path.expanduser(str(node_config.get("state-dir") or DEFAULT_STATE_DIR)))
    data_dir = node_config.get("data-dir") or None
    return Node(cfg, int(node_config["partition-id"]), int(node_config["num-partitions"]), state_dir,
                str(data_dir) if data_dir else None, log=_log)


class FedmutualClientApp(ClientApp):
    """A ClientApp that serves every message type: each is the running algorithm's handler of that name."""

    def __call__(self, message: Message, context: Context) -> Message:
        node = node_for(context.node_config, context.run_config)
        req = from_record(message.content)
        kind = str(req.pop("kind", message.metadata.message_type))
        reply = node.handle(kind, req)
        return Message(to_record(reply), reply_to=message)


client_app = FedmutualClientApp()

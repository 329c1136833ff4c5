"""An installed plug-in: a distribution whose entry points add an algorithm and a model, found without imports.

The distribution is real metadata on ``sys.path`` (a ``.dist-info`` directory with ``entry_points.txt``), so
``importlib.metadata`` discovers it exactly as it would a package installed with pip; the run is a fresh
``fedmutual`` process, which knows the plug-in's names only through those entry points.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGIN = '''
from torch import nn
from fedmutual.algorithms.fedavg import FedAvg


class ToyAvg(FedAvg):
    """FedAvg under another name, to show that a plug-in algorithm runs."""

    name = "toyavg"


def toy_net(input_shape, num_outputs):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 32), nn.ReLU(), nn.Linear(32, num_outputs))
'''


def test_entry_point_plugins_are_found_by_name(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "fm_toy_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "fm_toy_plugin.py").write_text(PLUGIN)
    (site / "fm_toy_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fm-toy-plugin\nVersion: 0.1\n")
    (site / "fm_toy_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[fedmutual.algorithms]\ntoyavg = fm_toy_plugin:ToyAvg\n\n[fedmutual.models]\ntoynet = fm_toy_plugin:toy_net\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "fedmutual", "run", "--algorithm", "toyavg", "--model", "toynet", "--clients", "2",
           "--rounds", "1", "--limit-train", "200", "--limit-test", "100", "--threads", "1", "--no-progress",
           "--checkpoint-every", "0", "--out", str(out), "--name", "toy"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cfg = json.loads((out / "toy" / "config.json").read_text())
    assert cfg["algorithm"] == "toyavg" and cfg["model"] == "toynet"
    rows = [json.loads(line) for line in (out / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["bytes_up"] > 0 and 0.0 <= rows[0]["global_acc"] <= 1.0
    # the CLI lists the plug-in's name only once it is found; an unknown name still lists the built-ins
    bad = subprocess.run([*cmd[:5], "toyavgx", *cmd[6:]], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown algorithm 'toyavgx'; allowed: fedavg" in bad.stderr and "Traceback" not in bad.stderr

"""Short seeded runs of every algorithm on a real Fashion-MNIST subset, and their recorded metrics.

``python tests/golden/scenarios.py record`` writes ``<name>-<engine>.jsonl`` beside this file;
``tests/test_golden.py`` runs the same configs and compares the metrics with the recorded ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
ENGINES = ("loop", "stacked")

BASE: dict[str, Any] = dict(
    dataset="fashion-mnist", limit_train=800, limit_test=200, clients=4, rounds=3, batch_size=32, lr=0.05,
    partition="dirichlet:0.5", model="lenet5", seed=3, threads=1, progress=False, checkpoint_every=0,
)

FAULTY = {"faults": {"crash": 0.25, "straggler": 0.7, "slowdown": 4.0, "deadline": 2.0}}

SCENARIOS: dict[str, dict[str, Any]] = {
    "fedavg": dict(algorithm="fedavg"),
    "fedprox": dict(algorithm="fedprox", model="mlp", fedprox={"mu": 0.1, "weighting": "uniform"}),
    "local": dict(algorithm="local", model="mlp,lenet5"),
    "independent": dict(algorithm="independent"),
    "fml": dict(algorithm="fml"),
    "fml-mh": dict(algorithm="fml", model="mlp,lenet5,cnn1", global_model="lenet5"),
    "fml-oh": dict(algorithm="fml", model="lenet5,cnn1", global_model="lenet5:features",
                   task=["classes", "groups:0,2,4,6|1,3,5,7,8,9"], fml={"alpha": 0.3, "beta": 0.7}),
    "dfml": dict(algorithm="dfml", model="mlp,lenet5", dfml={"participants": 3, "period": 2}),
    "dfedavg": dict(algorithm="dfedavg", dfedavg={"participants": 3, "wsm": True}),
    "dmlfl": dict(algorithm="dmlfl", model="mlp,lenet5", optimizer="adam", lr=0.001),
    "dmlfl-binary-topk": dict(algorithm="dmlfl", task="binary:0,2,4,6", model="mlp",
                              public={"mode": "static", "labels": False}, dmlfl={"compression": "fp16"}),
    "asyncfl": dict(algorithm="asyncfl", model="dmlcnn", rounds=3, asyncfl={"dense_every": 2}),
    "fedavg-folds": dict(algorithm="fedavg", local_data="folds", sample_fraction=0.5),
    # faults and attacks: the runtime's part
    "fml-faults": dict(algorithm="fml", attack={"kind": "nan", "clients": [3]}, **FAULTY),
    "fedavg-faults": dict(algorithm="fedavg", faults={"dropout": 0.3}, attack={"kind": "sign_flip", "count": 1},
                          aggregation={"rule": "median"}),
    "dfml-faults": dict(algorithm="dfml", model="mlp", clients=5, dfml={"participants": 4, "local_train_before_send": True},
                        attack={"kind": "noise", "clients": [1], "scale": 0.5}, **FAULTY),
    "dfedavg-faults": dict(algorithm="dfedavg", clients=5, dfedavg={"participants": 4},
                           attack={"kind": "sign_flip", "clients": [2]}, faults={"crash": 0.3, "min_replies": 2}),
    "dmlfl-faults": dict(algorithm="dmlfl", model="mlp", clients=5, attack={"kind": "constant_label", "clients": [0]},
                         aggregation={"rule": "median"}, **FAULTY),
    "asyncfl-faults": dict(algorithm="asyncfl", model="mlp", faults={"dropout": 0.2, "crash": 0.3},
                           attack={"kind": "noise", "clients": [2]}),
}


#: scenarios whose attack drives training far off (dfml-faults: a noisy model puts the aggregator's loss near 1e3
#: in round 2), where a gradient that large amplifies float rounding by orders of magnitude: on other float
#: kernels only their exact fields (participants, faults, bytes) can be compared
CHAOTIC = {"dfml-faults"}


def config(name: str, engine: str, out: str) -> dict[str, Any]:
    """The full config dict of scenario ``name`` on ``engine``, writing under ``out``."""
    return {**BASE, **SCENARIOS[name], "engine": engine, "out": out, "name": f"{name}-{engine}"}


def golden_path(name: str, engine: str) -> Path:
    return HERE / f"{name}-{engine}.jsonl"


def without_seconds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def environment() -> dict[str, str]:
    """What decides the float kernels: a run on another CPU capability or torch may round differently."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def record(names: list[str]) -> None:
    import tempfile

    from fedmutual import Config, run

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for engine in ENGINES:
                res = run(Config(**config(name, engine, tmp)), quiet=True)
                golden_path(name, engine).write_text("".join(json.dumps(r) + "\n" for r in without_seconds(res.metrics)))
                print(f"recorded {name}-{engine}: final {res.metrics[-1].get('client_acc_global_test_mean')}", flush=True)
    (HERE / "environment.json").write_text(json.dumps(environment(), indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "record":
        sys.exit("usage: python tests/golden/scenarios.py record [NAME ...]")
    record(sys.argv[2:] or list(SCENARIOS))

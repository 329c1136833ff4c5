"""Every ready-made config in configs/ validates, and builds a run (on a small subset of its data)."""

from pathlib import Path

import pytest

from fedmutual.config import build_config
from fedmutual.experiment.runner import build

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*"))
FILES = [p for p in CONFIGS if p.suffix in (".toml", ".json")]


def test_configs_are_found():
    assert FILES and all(p.suffix == ".toml" for p in FILES)
    assert [p.name for p in CONFIGS if p not in FILES] == []  # nothing in configs/ escapes the checks below


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_a_ready_config_validates_and_round_trips(path):
    cfg = build_config(path)
    assert path.name.split("-")[0] == cfg.algorithm or path.name == "quick.toml"
    assert build_config(None, cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_a_ready_config_builds_a_run(path):
    """The refusals that need the data and the models (architectures, tasks, public sets) pass too."""
    own = build_config(path)
    small = {"limit_train": own.limit_train or 100 * own.clients, "limit_test": 200, "device": "cpu", "threads": 1}
    cfg = build_config(path, small)
    b = build(cfg, log=lambda _: None)
    assert len(b.clients) == cfg.clients and b.alg.name == cfg.algorithm

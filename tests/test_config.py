import json
import re
import textwrap

import pytest

from fedmutual.config import Config, apply_override, build_config, validate
from fedmutual.errors import ConfigError
from fedmutual.registry import ALGORITHMS


def test_defaults_follow_the_paper_where_it_speaks():
    c = Config()
    assert (c.algorithm, c.batch_size, c.lr, c.momentum, c.weight_decay) == ("fml", 128, 0.01, 0.9, 5e-4)
    assert c.fml.alpha.at(0, 10) == 0.5 and c.fml.beta.at(0, 10) == 0.5 and not c.fml.weighted


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"fml\.gamma: unknown key"):
        validate({"fml": {"gamma": 1}})
    with pytest.raises(ConfigError, match=r"roundz: unknown key"):
        validate({"roundz": 3})


@pytest.mark.parametrize("data, key", [
    ({"alpha": 0.5}, "alpha"),  # an algorithm's setting at the top level
    ({"fmll": {"alpha": 0.5}}, "fmll"),  # a table no algorithm declares
    ({"transport": {"kind": "inprocess"}}, "transport"),
])
def test_unknown_top_level_keys_are_refused(data, key):
    with pytest.raises(ConfigError, match=rf"\n  {key}: unknown key$"):
        validate(data)


def test_invalid_values_name_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"algorithm: unknown algorithm 'fedsgd'; allowed: fedavg, fedprox, local, .*fml.*, "
                                          r"or an import string such as 'mypackage.module:Name'"):
        validate({"algorithm": "fedsgd"})
    with pytest.raises(ConfigError, match=r"model: unknown model 'resnet'; allowed: cnn1, cnn2, dmlcnn, fedavgcnn, lenet5, mlp"):
        validate({"model": "resnet"})
    with pytest.raises(ConfigError, match=r"lr: Input should be greater than 0"):
        validate({"lr": 0})
    with pytest.raises(ConfigError, match=r"partition: .*iid.*shards:P.*dirichlet:A"):
        validate({"partition": "shards"})
    with pytest.raises(ConfigError, match=r"dataset: unknown dataset 'imagenet'; allowed: fashion-mnist"):
        validate({"dataset": "imagenet"})


def test_file_flags_and_set_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nclients = 3\n[fml]\nbeta = 0.9\n')
    c = build_config(f, {"clients": 4}, ["fml.alpha.kind=\"linear\"", "fml.alpha.start=0.9", "fml.alpha.end=0.1", "lr=0.05"])
    assert (c.rounds, c.clients, c.lr) == (7, 4, 0.05)
    assert c.fml.beta.at(3, 7) == 0.9
    assert c.fml.alpha.at(0, 7) == pytest.approx(0.9) and c.fml.alpha.at(6, 7) == pytest.approx(0.1)


def test_resolved_config_round_trips_through_json(tmp_path):
    c = build_config(None, {"algorithm": "fedprox"}, ["fedprox.mu=0.1", "fml.beta=0.7"])
    p = tmp_path / "config.json"
    p.write_text(json.dumps(c.to_dict()))
    assert build_config(p) == c


def test_set_syntax_errors():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_override({}, "rounds")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("/nonexistent/x.toml")


def test_attack_kind_nan_needs_no_quotes():
    from fedmutual.config import build_config

    assert build_config(sets=["attack.kind=nan"]).attack.kind == "nan"
    assert build_config(sets=["attack.kind='sign_flip'"]).attack.kind == "sign_flip"


def test_global_model_names_a_zoo_model_or_a_named_part():
    assert validate({"global_model": "CNN2:Encoder"}).global_model == "cnn2:encoder"
    assert validate({"global_model": "lenet5"}).global_model == "lenet5"
    assert validate({}).global_model is None
    with pytest.raises(ConfigError, match="global_model: unknown model part 'convs'.*allowed: encoder, features"):
        validate({"global_model": "cnn2:convs"})


def test_task_may_be_a_list_assigned_round_robin():
    cfg = validate({"clients": 3, "task": ["classes", "groups:0,1|2,3,4,5,6,7,8,9"]})
    assert cfg.task_specs() == ["classes", "groups:0,1|2,3,4,5,6,7,8,9", "classes"]
    assert validate({"task": ["classes"]}).task == "classes"
    with pytest.raises(ConfigError, match="task: an empty list"):
        validate({"task": []})
    with pytest.raises(ConfigError, match="task: task 'groups:0,1': .*"):
        validate({"task": ["classes", "groups:0,1"]})


def test_independent_is_an_algorithm_name():
    assert validate({"algorithm": "independent"}).algorithm == "independent"


def test_ready_fml_configs_load_and_dynamic_presets_move_alpha_down_and_beta_up():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    mh = build_config(root / "fml-mh-fmnist.toml")
    assert mh.model_names() == ["mlp", "lenet5", "cnn1", "cnn2", "cnn2"] and mh.global_model == "lenet5" and mh.partition == "iid"
    oh = build_config(root / "fml-oh-fmnist.toml")
    assert oh.global_model == "cnn2:encoder" and oh.task_specs() == ["classes", "groups:0,2,4,6|1,3|5,7,9|8"]
    for name in ("fml-dynamic-step.toml", "fml-dynamic-cosine.toml"):
        cfg = build_config(root / name)
        T = cfg.rounds
        alphas = [cfg.fml.alpha.at(t, T) for t in range(T)]
        betas = [cfg.fml.beta.at(t, T) for t in range(T)]
        assert alphas == sorted(alphas, reverse=True) and alphas[0] > alphas[-1], name
        assert betas == sorted(betas) and betas[0] < betas[-1], name


def test_every_registered_algorithm_is_allowed_by_name():
    for name in ALGORITHMS.builtin_names():
        assert validate({"algorithm": name.upper().replace("-", "_")}).algorithm == name  # names are case-insensitive
    with pytest.raises(ConfigError, match=r"algorithm: algorithm 'nosuch.mod:Alg': cannot import module 'nosuch.mod'"):
        validate({"algorithm": "nosuch.mod:Alg"})
    with pytest.raises(ConfigError, match=r"algorithm: algorithm 'fedmutual.config:Config': .* is not an Algorithm subclass"):
        validate({"algorithm": "fedmutual.config:Config"})


@pytest.mark.parametrize("data, message", [
    ({"fml": {"alpha": 1.5}}, "fml.alpha.value: Input should be less than or equal to 1 (got 1.5)"),
    ({"fml": {"alpha": {"kind": "zigzag"}}}, "fml.alpha.kind: invalid value 'zigzag'; allowed: 'constant', 'step', 'linear' or 'cosine'"),
    ({"fml": {"temperature": 0}}, "fml.temperature: Input should be greater than 0 (got 0)"),
    ({"fml": {"adaptor_hidden": [0]}}, "fml.adaptor_hidden: hidden widths must be >= 1, got [0]"),
    ({"fml": 3}, "fml: Input should be a valid dictionary or instance of FMLSettings (got 3)"),
    ({"fedavg": {"weighting": "equal"}}, "fedavg.weighting: invalid value 'equal'; allowed: 'samples' or 'uniform'"),
    # a table is validated whichever algorithm runs
    ({"algorithm": "fedavg", "dfml": {"participants": 0}}, "dfml.participants: Input should be greater than or equal to"),
])
def test_an_algorithm_table_is_validated_by_its_settings_and_errors_name_the_table(data, message):
    with pytest.raises(ConfigError) as e:
        validate(data)
    assert message in str(e.value)


@pytest.fixture
def user_algorithms(tmp_path, monkeypatch):
    """A module of the user's own algorithms, importable by import string; the registry is restored afterwards."""
    (tmp_path / "cfg_test_algs.py").write_text(textwrap.dedent('''
        from pydantic import BaseModel, ConfigDict, Field

        from fedmutual.algorithms import FedAvg


        class TinySettings(BaseModel):
            model_config = ConfigDict(extra="forbid")
            mu: float = Field(default=0.5, gt=0)
            steps: int = 1


        class Tiny(FedAvg):
            name = "tiny"
            Settings = TinySettings
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = dict(ALGORITHMS._entries)
    yield "cfg_test_algs:Tiny"
    ALGORITHMS._entries.clear()
    ALGORITHMS._entries.update(saved)


def test_a_user_algorithm_table_is_validated_by_its_own_settings(user_algorithms):
    from fedmutual import register_algorithm

    cfg = validate({"algorithm": user_algorithms, "tiny": {"mu": 0.25}})
    assert cfg.algorithm == user_algorithms and cfg.table("tiny").mu == 0.25 and cfg.table("tiny").steps == 1
    assert validate({"algorithm": user_algorithms}).table("tiny").mu == 0.5  # chosen: present with its defaults
    with pytest.raises(ConfigError, match=r"tiny\.mu: Input should be greater than 0 \(got 0\)"):
        validate({"algorithm": user_algorithms, "tiny": {"mu": 0}})
    with pytest.raises(ConfigError, match=r"tiny\.gamma: unknown key"):
        validate({"algorithm": user_algorithms, "tiny": {"gamma": 1}})
    # registered by name: its table is known, and appears only where given or chosen
    import cfg_test_algs

    register_algorithm(cfg_test_algs.Tiny)
    assert "tiny" not in validate({}).tables()
    assert validate({"tiny": {"steps": 3}}).table("tiny").steps == 3
    with pytest.raises(ConfigError, match=r"tiny\.steps: Input should be a valid integer"):
        validate({"algorithm": "tiny", "tiny": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"the config has no \[nope\] table; known tables: fedavg, "):
        validate({}).table("nope")


@pytest.mark.parametrize("old, new", [("public", "public.mode"), ("public_size", "public.size"), ("public_labels", "public.labels"),
                                      ("public_dataset", "public.dataset")])
def test_moved_dmlfl_public_settings_say_where_they_went(old, new):
    value = {"public": "static", "public_size": 100, "public_labels": False, "public_dataset": "mnist"}[old]
    with pytest.raises(ConfigError, match=rf"dmlfl\.{old}: this setting moved to {re.escape(new)}$"):
        validate({"algorithm": "dmlfl", "dmlfl": {old: value}})
    key = new.split(".")[1]
    assert getattr(validate({"algorithm": "dmlfl", "public": {key: value}}).public, key) == value


def test_moved_settings_are_refused_from_set_too():
    with pytest.raises(ConfigError, match=r"dmlfl\.public_size: this setting moved to public\.size"):
        build_config(sets=["dmlfl.public_size=1000"])


@pytest.mark.parametrize("name", ALGORITHMS.builtin_names())
def test_config_json_round_trips_for_every_algorithm(name, tmp_path):
    cfg = validate({"algorithm": name, "clients": 6, "model": "mlp,lenet5", "global_model": "cnn2:encoder", "seed": 4,
                    "task": ["classes", "binary:0,1"], "public": {"mode": "static", "size": 50, "labels": False},
                    "faults": {"dropout": 0.1, "deadline": 2.0}, "attack": {"kind": "nan", "clients": [1]},
                    "aggregation": {"rule": "trimmed_mean", "trim": 0.2},
                    "fml": {"alpha": {"kind": "step", "values": [0.9, 0.1]}, "weighted": True}, "fedprox": {"mu": 0.1}})
    assert validate(cfg.to_dict()) == cfg
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))  # as a run directory stores it
    again = build_config(path)
    assert again == cfg and again.to_dict() == cfg.to_dict() and again.tables() == cfg.tables()


def test_config_json_of_a_user_algorithm_round_trips(user_algorithms):
    cfg = validate({"algorithm": user_algorithms, "tiny": {"mu": 0.75, "steps": 2}})
    assert validate(json.loads(json.dumps(cfg.to_dict()))) == cfg

import json

import pytest

from fedmutual.config import Config, apply_override, build_config, validate
from fedmutual.errors import ConfigError


def test_defaults_follow_the_paper_where_it_speaks():
    c = Config()
    assert (c.algorithm, c.batch_size, c.lr, c.momentum, c.weight_decay) == ("fml", 128, 0.01, 0.9, 5e-4)
    assert c.fml.alpha.at(0, 10) == 0.5 and c.fml.beta.at(0, 10) == 0.5 and not c.fml.weighted


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"fml\.gamma: unknown key"):
        validate({"fml": {"gamma": 1}})
    with pytest.raises(ConfigError, match=r"roundz: unknown key"):
        validate({"roundz": 3})


def test_invalid_values_name_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"algorithm: invalid value 'fedsgd'; allowed: 'fedavg', 'fedprox', 'local'.*'fml'"):
        validate({"algorithm": "fedsgd"})
    with pytest.raises(ConfigError, match=r"model: unknown model 'resnet'; allowed: cnn1, cnn2, dmlcnn, lenet5, mlp"):
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

"""Models a user registers (by name, import string or plug-in): building, configs, and partial global models."""

import sys
import textwrap

import pytest
import torch
from torch import nn

from fedmutual.config import validate
from fedmutual.errors import ConfigError
from fedmutual.models import build_encoder, build_model, parse_model_spec, register_model

NETS = textwrap.dedent('''
    from torch import nn


    class TinyBN(nn.Module):
        """Not a Sequential: whole model only."""

        def __init__(self, input_shape, num_outputs):
            super().__init__()
            c, h, w = input_shape
            self.conv = nn.Conv2d(c, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * h * w, num_outputs)

        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).relu().flatten(1))


    def seq_bn(input_shape, num_outputs):
        c, h, w = input_shape
        return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * h * w, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_outputs))
''')


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A user's module of models, importable as ``<name>``."""
    name = f"fm_nets_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def bn_net(input_shape, num_outputs):
    """A flat Sequential with BatchNorm, ending in a parameterless layer after the classifier."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * ((h - 2) // 2) * ((w - 2) // 2), 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Linear(32, num_outputs), nn.Identity(),
    )


class NoFlatten(nn.Sequential):
    def __init__(self, input_shape, num_outputs):
        super().__init__(nn.Linear(input_shape[-1], 5), nn.ReLU(), nn.Linear(5, num_outputs))


def test_a_registered_batchnorm_model_is_built_by_name():
    register_model("BN_Net", bn_net)
    model = build_model("bn-net", (1, 12, 12), 3)
    assert isinstance(model[1], nn.BatchNorm2d)
    assert model(torch.zeros(4, 1, 12, 12)).shape == (4, 3)
    cfg = validate({"model": "BN_Net", "global_model": "bn_net:ENCODER"})
    assert cfg.model == "bn-net" and cfg.global_model == "bn-net:encoder"


def test_import_strings_keep_their_case_in_lists_and_round_robin(nets):
    tiny = f"{nets}:TinyBN"
    model = build_model(tiny, (3, 6, 6), 4)
    assert type(model).__name__ == "TinyBN" and model(torch.zeros(2, 3, 6, 6)).shape == (2, 4)
    cfg = validate({"model": f"MLP, {tiny}", "clients": 3})
    assert cfg.model == ["mlp", tiny] and cfg.model_names() == ["mlp", tiny, "mlp"]
    assert validate({"model": [tiny, "lenet5"]}).model == [tiny, "lenet5"]
    assert validate({"model": tiny}).model == tiny


def test_model_config_errors():
    with pytest.raises(ConfigError, match=r"model: unknown model 'resnet'; allowed: cnn1, cnn2, dmlcnn, fedavgcnn, lenet5, mlp, "
                                          r"or an import string"):
        validate({"model": "mlp,resnet"})
    with pytest.raises(ConfigError, match=r"model: model 'no_such_fm_pkg.nets:Net': cannot import module"):
        validate({"model": "no_such_fm_pkg.nets:Net"})
    with pytest.raises(ConfigError, match="model: unknown model '\\(empty\\)'"):
        validate({"model": []})


def test_parse_model_spec_separates_an_import_string_from_its_part(nets):
    seq = f"{nets}:seq_bn"
    assert parse_model_spec(seq) == (seq, None)
    assert parse_model_spec(f"{seq}:Encoder") == (seq, "encoder")
    assert parse_model_spec(f" {seq}:features ") == (seq, "features")
    assert parse_model_spec("CNN2:Encoder") == ("cnn2", "encoder")
    assert parse_model_spec("lenet5") == ("lenet5", None)
    assert validate({"global_model": f"{seq}:encoder"}).global_model == f"{seq}:encoder"
    with pytest.raises(ConfigError, match=f"unknown model part 'convs' in '{seq}:convs'"):
        parse_model_spec(f"{seq}:convs")
    with pytest.raises(ConfigError, match="unknown model part 'convs' in 'cnn2:convs'"):
        parse_model_spec("cnn2:convs")


def test_encoder_and_features_of_a_registered_sequential():
    register_model("bn-net", bn_net)
    full = build_model("bn-net", (1, 12, 12), 3)
    enc, width = build_encoder("bn-net", "encoder", (1, 12, 12))
    # every layer before the last one with parameters (the classifier and the Identity after it are cut)
    assert [type(m) for m in enc] == [type(m) for m in list(full)[:8]] and width == 32
    feats, fwidth = build_encoder("bn-net", "features", (1, 12, 12))
    assert [type(m) for m in feats] == [type(m) for m in list(full)[:5]] and fwidth == 8 * 5 * 5
    # finding the width runs in eval mode: no batch statistics leak into the fresh encoder, and it stays in training mode
    assert enc.training and enc[1].training
    assert torch.equal(enc[1].running_mean, torch.zeros(8)) and int(enc[1].num_batches_tracked) == 0
    # the encoder's parameters are the full model's prefix under the same seed
    torch.manual_seed(3)
    a = build_model("bn-net", (1, 12, 12), 1)
    torch.manual_seed(3)
    b, _ = build_encoder("bn-net", "encoder", (1, 12, 12))
    assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items() if k in b.state_dict())
    assert set(b.state_dict()) == {k for k in a.state_dict() if int(k.split(".")[0]) < 8}


def test_encoder_of_an_import_string_sequential(nets):
    enc, width = build_encoder(f"{nets}:seq_bn", "encoder", (1, 5, 5))
    assert len(enc) == 7 and width == 16
    assert enc(torch.zeros(3, 1, 5, 5)).shape == (3, 16)


def test_zoo_encoders_are_unchanged():
    for name in ("mlp", "lenet5", "cnn1", "cnn2", "dmlcnn"):
        full = build_model(name, (1, 28, 28), 10)
        enc, _ = build_encoder(name, "encoder", (1, 28, 28))
        assert list(enc._modules) == [str(i) for i in range(len(full) - 1)]


def test_a_non_sequential_has_no_parts(nets):
    tiny = f"{nets}:TinyBN"
    with pytest.raises(ConfigError) as e:
        parse_model_spec(f"{tiny}:encoder")
    assert f"model {tiny!r} is a TinyBN, not an nn.Sequential" in str(e.value)
    with pytest.raises(ConfigError, match=r"global_model: model part .* not an nn.Sequential"):
        validate({"global_model": f"{tiny}:encoder"})
    with pytest.raises(ConfigError, match="not an nn.Sequential"):
        build_encoder(tiny, "encoder", (1, 4, 4))


def test_a_sequential_without_flatten_has_no_features():
    register_model("no-flatten", NoFlatten)
    assert parse_model_spec("no-flatten:encoder") == ("no-flatten", "encoder")
    with pytest.raises(ConfigError, match="model 'no-flatten' has no nn.Flatten among its layers, so it has no part 'features'"):
        parse_model_spec("no-flatten:features")
    enc, width = build_encoder("no-flatten", "encoder", (1, 1, 7))  # a Sequential subclass with its own constructor
    assert type(enc) is nn.Sequential and width == 5


def test_parts_without_trainable_layers_are_refused():
    register_model("one-layer", lambda shape, k: nn.Sequential(nn.Flatten(), nn.Linear(shape[0] * shape[1] * shape[2], k)))
    with pytest.raises(ConfigError, match="model part 'one-layer:encoder' has no trainable layers; use the whole model"):
        parse_model_spec("one-layer:encoder")
    with pytest.raises(ConfigError, match="model part 'mlp:features' has no trainable layers; use mlp:encoder"):
        parse_model_spec("mlp:features")


def test_broken_builders_give_plain_errors():
    register_model("returns-int", lambda shape, k: 3)
    register_model("wrong-signature", lambda shape: nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="model 'returns-int': its builder returned a int, not an nn.Module"):
        build_model("returns-int", (1, 2, 2), 2)
    with pytest.raises(ConfigError, match=r"model 'wrong-signature': building it for inputs \(1, 2, 2\) with 2 outputs failed \(TypeError"):
        build_model("wrong-signature", (1, 2, 2), 2)
    with pytest.raises(ConfigError, match="num_classes must be >= 1"):
        build_model("mlp", (1, 2, 2), 0)
    with pytest.raises(ConfigError, match=r"unknown model 'nope'; allowed: cnn1, cnn2, dmlcnn, fedavgcnn, lenet5, mlp, "):
        build_model("nope", (1, 2, 2), 2)

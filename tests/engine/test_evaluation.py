import pytest
import torch
from torch import nn

from fedmutual.engine.cohort import accuracy
from fedmutual.engine.evaluation import _stacked_correct, shared_accuracies
from fedmutual.models import build_model


def _data(n=300, shape=(1, 28, 28), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _models(name, k=4, shape=(1, 28, 28), classes=10):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append(build_model(name, shape, classes))
    return out


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cnn1", "cnn2"])
def test_stacked_evaluation_counts_what_each_model_predicts(name):
    x, y = _data(96 if name == "cnn2" else 300)
    models = _models(name)
    expected = [round(accuracy(m, x, y) * len(y)) for m in models]
    assert _stacked_correct(models, x, y, batch=37) == expected  # ragged last batch included


def _bn_dropout_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(0.5), nn.Flatten(),
        nn.Linear(4 * 13 * 13, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3),
    )


def test_stacked_evaluation_uses_running_statistics_and_no_dropout():
    x, y = _data(200, classes=3)
    models = [_bn_dropout_model(i) for i in range(3)]
    for i, m in enumerate(models):  # distinct, non-trivial running statistics
        m.train()
        with torch.no_grad():
            for s in range(0, 200, 50):
                m(x[s : s + 50] * (1 + i) + i)
        m.train(i % 2 == 0)  # evaluation must not depend on the mode a model was left in
    modes = [m.training for m in models]
    expected = [accuracy(m, x, y) for m in models]
    assert shared_accuracies(models, x, y, batch_size=64, engine="stacked") == expected
    assert [m.training for m in models] == modes


def test_single_output_models_are_binary():
    x, _ = _data(200)
    y = (torch.arange(200) % 3 == 0).long()
    models = _models("lenet5", k=3, classes=1)
    for m in models:
        with torch.no_grad():
            m[-1].bias.fill_(0.05)  # logits near 0, so both classes are predicted
    expected = [accuracy(m, x, y) for m in models]
    assert shared_accuracies(models, x, y, engine="stacked") == expected


def test_shared_accuracies_keep_order_and_evaluate_a_repeated_model_once():
    x, y = _data(120)
    lenets, mlps = _models("lenet5", k=3), _models("mlp", k=2)
    models = [lenets[0], mlps[0], lenets[1], lenets[0], mlps[1], lenets[2]]
    calls = []
    lenets[0].register_forward_pre_hook(lambda *a: calls.append(1))  # a hooked model takes the plain path
    expected = [accuracy(m, x, y) for m in models]
    calls.clear()
    for engine in ("loop", "stacked", "auto"):
        assert shared_accuracies(models, x, y, batch_size=50, engine=engine) == expected
    assert len(calls) == 3 * 3  # once per engine, 3 batches each, although listed twice

"""Stacked evaluation against each model's own: the same predictions, where rounding can decide them.

A prediction is the argmax of the logits (or the sign of a single logit). Two float32 evaluations in
different summation orders may disagree only on a sample whose decision margin, in the exact
(float64) logits, is within their rounding errors; every other sample must get the same prediction.
The rounding error of the stacked forward is taken, as in ``test_stacked.assert_same``, as SPREAD
times the model's own float32 logit error plus one rounding of the logits' scale. So a count of
correct predictions may differ from the model's own by at most the number of such samples (almost
always none: the counts must then be equal). In float64 the a priori bound u·n·L·A (L layers, sums
of at most n terms, activations at most A) leaves no sample in doubt.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedmutual.engine.cohort import accuracy
from fedmutual.engine.evaluation import _stacked_correct, own_accuracies, shared_accuracies
from fedmutual.models import build_model

U64, U32 = 2.0**-53, 2.0**-24
SPREAD = 8.0


def _data(n=300, shape=(1, 28, 28), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _models(name, k=4, shape=(1, 28, 28), classes=10):
    out = []
    for i in range(k):
        torch.manual_seed(i)
        out.append(build_model(name, shape, classes))
    return out


@dataclass
class Reference:
    """A model's predictions on (x, y): exact (float64), its own float32 ones, and which rounding may decide."""

    exact_correct: int  # correct predictions of the float64 model
    own_correct: int  # correct predictions of the model itself (``accuracy``)
    in_doubt: int  # samples whose exact margin is within twice the float32 error allowed to each logit
    certain64: bool  # no margin within the a priori float64 bound


@torch.no_grad()
def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Reference:
    """The model's predictions in float64 and as it is, in evaluation mode (its own mode is restored)."""
    exact_model = copy.deepcopy(model).double().eval()
    h, scale = x.double(), float(x.abs().max())
    layers = [m for m in exact_model.modules() if not any(True for _ in m.children())]  # a Sequential's leaves, in order
    for layer in layers:
        h = layer(h)
        scale = max(scale, float(h.abs().max()))
    n = max(m.weight[0].numel() for m in layers if type(m) in (nn.Linear, nn.Conv2d))
    mode = model.training
    own_logits = model.eval()(x)
    model.train(mode)
    if h.shape[-1] == 1:
        margin, pred = h[:, 0].abs(), (h[:, 0] > 0).long()  # the decision is logit > 0
        own_pred = (own_logits[:, 0] > 0).long()
    else:
        top = h.topk(2, dim=-1).values
        margin, pred, own_pred = top[:, 0] - top[:, 1], h.argmax(-1), own_logits.argmax(-1)
    own_error = float((own_logits.double() - h).abs().max()) + U32 * float(h.abs().max())
    return Reference(int((pred == y).sum()), int((own_pred == y).sum()), int((margin <= 2 * SPREAD * own_error).sum()),
                     bool((margin > 4 * U64 * n * len(layers) * scale).all()))


def _assert_counts(refs: list[Reference], counts: list[int], what: str) -> None:
    """Counts of correct predictions against each model's own, up to the samples rounding may decide."""
    for i, (r, c) in enumerate(zip(refs, counts)):
        assert abs(c - r.own_correct) <= r.in_doubt, f"{what}: model {i} has {c} correct, alone {r.own_correct}"


@pytest.mark.parametrize("name", ["mlp", "lenet5", "cnn1", "cnn2"])
def test_stacked_evaluation_counts_what_each_model_predicts(name):
    x, y = _data(96 if name == "cnn2" else 300)
    models = _models(name)
    refs = [reference(m, x, y) for m in models]
    assert all(r.own_correct == round(accuracy(m, x, y) * len(y)) for r, m in zip(refs, models))
    _assert_counts(refs, _stacked_correct(models, x, y, batch=37), "float32")  # ragged last batch included
    # float64: every prediction is the exact one
    assert all(r.certain64 for r in refs)
    doubles = [copy.deepcopy(m).double() for m in models]
    assert _stacked_correct(doubles, x.double(), y, batch=37) == [r.exact_correct for r in refs]


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
    accs = shared_accuracies(models, x, y, batch_size=64, engine="stacked")
    assert [m.training for m in models] == modes
    _assert_counts([reference(m, x, y) for m in models], [round(a * len(y)) for a in accs], "stacked")


def test_single_output_models_are_binary():
    x, _ = _data(200)
    y = (torch.arange(200) % 3 == 0).long()
    models = _models("lenet5", k=3, classes=1)
    for m in models:
        with torch.no_grad():
            m[-1].bias.fill_(0.05)  # logits near 0, so both classes are predicted
    accs = shared_accuracies(models, x, y, engine="stacked")
    _assert_counts([reference(m, x, y) for m in models], [round(a * len(y)) for a in accs], "stacked")


def test_shared_accuracies_keep_order_and_evaluate_a_repeated_model_once():
    x, y = _data(120)
    lenets, mlps = _models("lenet5", k=3), _models("mlp", k=2)
    models = [lenets[0], mlps[0], lenets[1], lenets[0], mlps[1], lenets[2]]
    calls = []
    lenets[0].register_forward_pre_hook(lambda *a: calls.append(1))  # a hooked model takes the plain path
    expected = [accuracy(m, x, y) for m in models]
    in_doubt = [reference(m, x, y).in_doubt for m in models]
    calls.clear()
    for engine in ("loop", "stacked", "auto"):
        accs = shared_accuracies(models, x, y, batch_size=50, engine=engine)
        if engine == "loop":
            assert accs == expected  # the same computation
        for i, (a, e, d) in enumerate(zip(accs, expected, in_doubt)):
            assert abs(round(a * len(y)) - round(e * len(y))) <= d, f"{engine}: model {i}"
        assert accs[0] == accs[3]  # the same model
    assert len(calls) == 3 * 3  # once per engine, 3 batches each, although listed twice


@pytest.mark.parametrize("name", ["lenet5", "fedavgcnn"])
def test_each_model_on_its_own_data_counts_what_it_predicts_alone(name):
    """own_accuracies (validation splits): model i on data i, stacked where lengths and architectures agree, within
    the samples rounding may decide of each model's own predictions; the loop engine is the plain computation."""
    models = _models(name, k=4)
    data = [_data(150, seed=s) for s in range(3)] + [_data(90, seed=3)]  # the last length differs: alone
    xs, ys = [x for x, _ in data], [y for _, y in data]
    refs = [reference(m, x, y) for m, x, y in zip(models, xs, ys)]
    loop = own_accuracies(models, xs, ys, batch_size=64, engine="loop")
    assert loop == [accuracy(m, x, y, 64) for m, x, y in zip(models, xs, ys)]
    for engine in ("stacked", "auto"):
        accs = own_accuracies(models, xs, ys, batch_size=64, engine=engine)
        _assert_counts(refs, [round(a * len(y)) for a, y in zip(accs, ys)], engine)
    mixed = [models[0], _models("mlp", k=1)[0], models[0]]  # other architectures and a repeated model: one by one
    assert own_accuracies(mixed, xs[:3], ys[:3], engine="stacked") == [accuracy(m, x, y) for m, x, y in zip(mixed, xs[:3], ys[:3])]
    assert own_accuracies([], [], []) == []

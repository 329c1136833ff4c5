import pytest
import torch
from torch import nn

from fedmutual.engine.stacking import architecture
from fedmutual.models import build_model


@pytest.mark.parametrize("shape, flat", [((3, 100, 100), 21 * 21 * 64), ((1, 28, 28), 3 * 3 * 64), ((3, 32, 32), 4 * 4 * 64)])
def test_dmlcnn_layers_and_parameter_count_by_hand(shape, flat):
    model = build_model("dmlcnn", shape, 1)
    c = shape[0]
    convs = (c * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 64 + 64)
    dense = (flat * 64 + 64) + (64 + 1)
    assert sum(p.numel() for p in model.parameters()) == convs + dense
    assert [type(m) for m in model] == [
        nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.Flatten,
        nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
    ]
    assert model[9].p == model[12].p == 0.2
    assert model(torch.zeros(2, *shape)).shape == (2, 1)
    assert architecture(model) is not None  # the stacked engine converts it
    assert sum(p.numel() for p in build_model("dmlcnn", shape, 10).parameters()) == convs + flat * 64 + 64 + 65 * 10


def test_fedavgcnn_layers_and_parameter_count_by_hand():
    model = build_model("fedavgcnn", (1, 28, 28), 10)
    assert [type(m) for m in model] == [
        nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Linear,
    ]
    assert (model[0].kernel_size, model[0].padding, model[3].kernel_size, model[3].padding) == ((5, 5), (0, 0), (5, 5), (0, 0))
    # 28 -> conv5 24 -> pool 12 -> conv5 8 -> pool 4: 64 * 4 * 4 = 1024 features
    convs = (1 * 25 * 32 + 32) + (32 * 25 * 64 + 64)
    dense = (1024 * 512 + 512) + (512 * 10 + 10)
    assert convs + dense == 582_026
    assert sum(p.numel() for p in model.parameters()) == 582_026
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert architecture(model) is not None

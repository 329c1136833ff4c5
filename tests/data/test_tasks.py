import pytest
import torch

from fedmutual.config import Config, validate
from fedmutual.data.tasks import parse_task
from fedmutual.errors import ConfigError


def test_classes_is_identity():
    t = parse_task("classes", 10)
    assert t.identity and t.num_classes == 10 and t.num_outputs == 10 and not t.binary
    y = torch.tensor([3, 9, 0])
    assert t.apply(y) is y


def test_binary_maps_listed_classes_to_one():
    t = parse_task("binary:0,2,4,6", 10)
    assert t.binary and t.num_classes == 2 and t.num_outputs == 1
    assert t.label_map == (1, 0, 1, 0, 1, 0, 1, 0, 0, 0)
    assert t.apply(torch.tensor([0, 1, 2, 3, 6, 9])).tolist() == [1, 0, 1, 0, 1, 0]


def test_groups_number_groups_in_order_given():
    t = parse_task("groups:5,6,7,8,9|0,2,4|1,3", 10)
    assert t.num_classes == 3 and t.num_outputs == 3 and not t.binary
    assert t.label_map == (1, 2, 1, 2, 1, 0, 0, 0, 0, 0)
    assert t.apply(torch.tensor([9, 0, 3])).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("coarse", "unknown kind 'coarse'"),
        ("binary", "binary needs classes"),
        ("binary:0,x", "'x' is not a class number"),
        ("binary:0,0", "listed twice"),
        ("binary:0,12", "class 12 is out of range; the dataset has classes 0..9"),
        ("binary:0,1,2,3,4,5,6,7,8,9", "every class is positive"),
        ("groups:0,1|1,2,3,4,5,6,7,8,9", "class 1 is in more than one group"),
        ("groups:0,1|2,3", "classes 4, 5, 6, 7, 8, 9 are in no group"),
        ("groups:0,1,2,3,4,5,6,7,8,9", "at least two groups"),
        ("classes:3", "takes no arguments"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_task(spec, 10)


def test_config_validates_task_syntax():
    assert Config(task="binary:0,2").task == "binary:0,2"
    with pytest.raises(ConfigError, match="task: task 'binary:a': 'a' is not a class number"):
        validate({"task": "binary:a"})

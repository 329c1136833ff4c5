"""The generic registry (names, replace/duplicate rules, import strings, plug-ins) and the public registries."""

import sys
from importlib import metadata

import numpy as np
import pytest
from torch import nn

from fedmutual.data import DATASETS, PARTITIONS, register_dataset, register_partition
from fedmutual.errors import ConfigError
from fedmutual.models import MODELS, register_model
from fedmutual.registry import Registry, canonical, import_object, is_import_string


def _callable(name, obj):
    if not callable(obj):
        raise TypeError(f"not callable: {obj!r}")
    return obj


@pytest.fixture
def reg():
    return Registry("widget", check=_callable)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's, importable for this test only."""
    name = f"fm_user_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text("def Make(*a):\n    return 'made'\n\nNOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def restore():
    """Undo what a test registers in the public registries."""
    saved = [(r, dict(r._entries)) for r in (MODELS, DATASETS, PARTITIONS)]
    yield
    for r, entries in saved:
        r._entries.clear()
        r._entries.update(entries)


def test_names_are_case_insensitive_and_dash_underscore_blind(reg):
    f = lambda: 1  # noqa: E731
    reg.register("My_Widget", f)
    assert reg.names() == ["my-widget"]
    assert reg.get("MY-WIDGET") is f and reg.get("my_widget") is f
    assert "My_Widget" in reg and "other" not in reg
    assert list(reg) == ["my-widget"]


def test_duplicates_are_refused_unless_replaced(reg):
    f, g = (lambda: 1), (lambda: 2)
    reg.register("w", f)
    reg.register("w", f)  # the same object again is harmless
    with pytest.raises(ValueError, match="a widget named 'w' is already registered; pass replace=True"):
        reg.register("W", g)
    assert reg.get("w") is f
    reg.register("w", g, replace=True)
    assert reg.get("w") is g


@pytest.mark.parametrize("name", ["", "a:b", "a,b", "  "])
def test_invalid_names(reg, name):
    with pytest.raises(ValueError, match="invalid widget name"):
        reg.register(name, lambda: 1)


def test_the_check_runs_on_register_and_reports_a_config_error(reg):
    with pytest.raises(ConfigError, match="widget 'w': not callable: 3"):
        reg.register("w", 3)
    assert "w" not in reg.names()


def test_unknown_names_list_the_choices(reg):
    reg.register("alpha", lambda: 1)
    with pytest.raises(ConfigError, match=r"unknown widget 'beta'; allowed: alpha, or an import string"):
        reg.get("beta")


def test_import_strings_keep_their_case_and_are_checked(reg, user_module):
    spec = f"{user_module}:Make"
    assert is_import_string(spec) and canonical(spec) == spec
    assert reg.get(spec)() == "made"
    assert spec in reg
    with pytest.raises(ConfigError, match="widget .*NOT_CALLABLE.*not callable: 3"):
        reg.get(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match=f"module '{user_module}' has no attribute 'Missing'"):
        reg.get(f"{user_module}:Missing")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_fm.sub'"):
        reg.get("no_such_pkg_fm.sub:Thing")


def test_is_import_string():
    assert is_import_string("a.b:C") and is_import_string("a:b")
    assert not is_import_string("cnn2") and not is_import_string("a.b:") and not is_import_string(":C")
    assert not is_import_string("a-b:C") and not is_import_string("a.b:C:encoder")
    assert import_object("json:loads", "thing") is __import__("json").loads


def test_plug_ins_come_from_entry_points(reg, user_module, monkeypatch):
    ep = metadata.EntryPoint(name="Plugged_In", value=f"{user_module}:Make", group="fedmutual.widgets")
    broken = metadata.EntryPoint(name="broken", value="no_such_pkg_fm:X", group="fedmutual.widgets")

    def entry_points(group=None):
        assert group == "fedmutual.widgets"
        return [ep, broken]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    assert reg.get("plugged-in")() == "made"
    assert "plugged-in" in reg.names()  # loaded once, then listed
    with pytest.raises(ConfigError, match="widget 'broken': the plug-in 'no_such_pkg_fm:X' failed to load"):
        reg.get("broken")


def test_the_public_registries_hold_the_built_ins():
    assert MODELS.names()[:5] == ["mlp", "lenet5", "cnn1", "cnn2", "dmlcnn"]
    assert DATASETS.names()[:5] == ["fashion-mnist", "mnist", "idx", "cifar10", "cifar100"]
    assert PARTITIONS.names()[:4] == ["iid", "shards", "dirichlet", "indices"]


def test_public_register_functions_refuse_duplicates_and_bad_entries(restore):
    build = lambda shape, k: nn.Linear(1, k)  # noqa: E731
    assert register_model("reg-test-net", build) is build
    with pytest.raises(ValueError, match="already registered"):
        register_model("reg-test-net", lambda shape, k: nn.Linear(1, k))
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", build)
    register_model("reg-test-net", nn.Identity, replace=True)
    assert MODELS.get("reg-test-net") is nn.Identity
    with pytest.raises(ConfigError, match="model 'reg-test-bad': a model builder must be a callable"):
        register_model("reg-test-bad", "not a builder")
    with pytest.raises(ConfigError, match="dataset 'reg-test-bad': a dataset must be a loader"):
        register_dataset("reg-test-bad", 42)
    with pytest.raises(ConfigError, match="partition 'reg-test-bad': a partitioner must be a callable"):
        register_partition("reg-test-bad", [np.arange(3)])
    with pytest.raises(ValueError, match="'shards' is a built-in partition and cannot be replaced"):
        register_partition("Shards", lambda *a: [], replace=True)

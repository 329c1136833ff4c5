"""Tasks: what a client learns from a dataset's labels.

A task maps each class of the dataset to one of its own classes. The same
images can then serve a 10-class problem, a coarse grouping of those classes,
or a binary problem ("upper-body clothing or not"). Clients may hold different
tasks; the data and its partition stay those of the dataset.

Specs:
- ``classes``: the dataset's own classes (the identity map).
- ``binary:0,2,4,6``: the listed classes are 1, every other class is 0. A binary
  task has one output (a sigmoid logit) instead of two softmax outputs.
- ``groups:0,2,4|1,3|5,6,7,8,9``: each ``|``-separated group becomes one class,
  numbered in the order given; every dataset class must be in exactly one group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmutual.errors import ConfigError

KINDS = ("classes", "binary", "groups")


@dataclass(frozen=True)
class Task:
    """A label map from dataset classes to task classes."""

    spec: str
    label_map: tuple[int, ...]  # dataset class c -> task class label_map[c]
    num_classes: int  # classes of the task (2 for a binary task)
    binary: bool = False  # one sigmoid output trained with BCE

    @property
    def num_outputs(self) -> int:
        """Outputs of a model for this task: 1 for a binary task, else one per class."""
        return 1 if self.binary else self.num_classes

    @property
    def identity(self) -> bool:
        return not self.binary and self.label_map == tuple(range(len(self.label_map)))

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The task's labels for dataset labels ``y`` (int64, same shape and device)."""
        if self.identity:
            return y
        table = torch.tensor(self.label_map, dtype=torch.int64, device=y.device)
        return table[y.long()]


def _classes(text: str, spec: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ConfigError(f"task {spec!r}: {part!r} is not a class number; classes are listed as 0,2,4")
        out.append(int(part))
    return out


def parse_task(spec: str, dataset_classes: int | None = None) -> Task:
    """Read a task spec (see the module docstring).

    Without ``dataset_classes`` only the syntax is checked (for config
    validation) and the label map covers the classes named. With it, the map
    covers every dataset class and classes out of range are refused.
    """
    text = spec.strip().lower()
    kind, _, args = text.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"task {spec!r}: unknown kind {kind!r}; allowed: classes, binary:C1,C2,..., groups:A,B|C|...")
    n = dataset_classes
    if kind == "classes":
        if args:
            raise ConfigError(f"task {spec!r}: 'classes' takes no arguments")
        size = n if n is not None else 0
        return Task("classes", tuple(range(size)), size)
    if not args:
        raise ConfigError(f"task {spec!r}: {kind} needs classes, e.g. binary:0,2,4,6 or groups:0,1|2,3")
    if kind == "binary":
        positive = _classes(args, spec)
        if len(set(positive)) != len(positive):
            raise ConfigError(f"task {spec!r}: a class is listed twice")
        top = n if n is not None else max(positive) + 1
        bad = [c for c in positive if c >= top]
        if bad:
            raise ConfigError(f"task {spec!r}: class {bad[0]} is out of range; the dataset has classes 0..{top - 1}")
        if n is not None and len(positive) == n:
            raise ConfigError(f"task {spec!r}: every class is positive, so the task has one class; list a strict subset")
        pos = set(positive)
        return Task(text, tuple(int(c in pos) for c in range(top)), 2, binary=True)
    groups = [_classes(g, spec) for g in args.split("|")]
    flat = [c for g in groups for c in g]
    if len(set(flat)) != len(flat):
        dup = next(c for c in flat if flat.count(c) > 1)
        raise ConfigError(f"task {spec!r}: class {dup} is in more than one group")
    top = n if n is not None else max(flat) + 1
    bad = [c for c in flat if c >= top]
    if bad:
        raise ConfigError(f"task {spec!r}: class {bad[0]} is out of range; the dataset has classes 0..{top - 1}")
    missing = sorted(set(range(top)) - set(flat))
    if missing:
        raise ConfigError(f"task {spec!r}: classes {', '.join(map(str, missing))} are in no group; every class needs one")
    if len(groups) < 2:
        raise ConfigError(f"task {spec!r}: one group is a task with one class; give at least two groups")
    table = [0] * top
    for g, members in enumerate(groups):
        for c in members:
            table[c] = g
    return Task(text, tuple(table), len(groups))

"""One typed, validated configuration tree.

A :class:`Config` comes from defaults, an optional TOML or JSON file, command-line
flags and ``--set dotted.key=value`` overrides, in that order. Unknown keys are
refused; every invalid value is reported with its key and what is allowed.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedmutual.errors import ConfigError, FedmutualError

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_compression(spec: str) -> tuple[str, int]:
    """``"none"``, ``"fp16"`` or ``"topk:K"`` (K >= 1) -> (kind, K); raises ValueError naming the forms."""
    text = spec.strip().lower()
    if text in ("none", "fp16"):
        return text, 0
    kind, _, arg = text.partition(":")
    if kind == "topk" and arg.strip().isdigit() and int(arg) >= 1:
        return "topk", int(arg)
    raise ValueError(f"invalid compression {spec!r}; allowed: 'none', 'fp16' or 'topk:K' with an integer K >= 1 (e.g. 'topk:3')")


class PublicConfig(_Strict):
    """The public set of methods that share knowledge on public data (DML-FL), and of ``local_data = "folds"``."""

    mode: Literal["dynamic", "static"] = "dynamic"  # dynamic: a fresh stratified fold every round
    size: int | None = Field(default=None, ge=1)  # default: a fold, training samples // (clients + 1)
    labels: bool = True  # False: the public set is unlabelled and trained with the KL only
    dataset: str | None = None  # draw the public set from this dataset instead of carving it from the run's

    @field_validator("dataset")
    @classmethod
    def _public_dataset(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from fedmutual.data.datasets import DATASETS
        from fedmutual.registry import canonical

        key = canonical(v)
        try:
            DATASETS.get(key)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return key


class FaultsConfig(_Strict):
    """Simulated failing clients, drawn per round and client from the run seed (see fedmutual.runtimes.faults)."""

    dropout: float = Field(default=0.0, ge=0, le=1)  # probability a sampled client is offline for the round
    crash: float = Field(default=0.0, ge=0, le=1)  # probability its update raises an exception half-way
    straggler: float = Field(default=0.0, ge=0, le=1)  # probability it is slow this round
    slowdown: float = Field(default=4.0, ge=1)  # a straggler takes U(1, slowdown) times a normal client's time
    deadline: float | None = Field(default=None, gt=0)  # in normal client times; replies later than it are dropped
    min_replies: int = Field(default=1, ge=1)  # fewer valid replies than this: the round is skipped


class AttackConfig(_Strict):
    """Simulated hostile clients: what they do to every message they send."""

    kind: Literal["none", "sign_flip", "noise", "constant_label", "nan"] = "none"
    clients: list[int] = Field(default_factory=list)  # attacker ids; with count, a seeded draw adds the rest
    count: int = Field(default=0, ge=0)  # number of attackers drawn from the seed (stream "attackers")
    scale: float = Field(default=1.0, ge=0)  # sign_flip: ref - scale·(x - ref); noise: standard deviation
    label: int = Field(default=0, ge=0)  # constant_label: the label every prediction claims

    @field_validator("kind", mode="before")
    @classmethod
    def _nan_word(cls, v: object) -> object:
        # `--set attack.kind=nan` reads as the TOML float nan; the user meant the attack
        return "nan" if isinstance(v, float) and v != v else v


class AggregationConfig(_Strict):
    """How replies are combined: the mean, or a robust rule that ignores extreme values per coordinate."""

    rule: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim: float = Field(default=0.1, ge=0, lt=0.5)  # trimmed_mean drops floor(trim·n) values at each end


class Config(_Strict):
    """Everything that defines a run. Defaults follow the FML paper where it speaks.

    Besides the keys below, a config holds one table per algorithm with settings of its own (``[fml]``,
    ``[dmlfl]``, ...), validated by that algorithm's ``Settings`` model: the built-in algorithms' tables and
    the chosen algorithm's are always present, with their defaults; ``cfg.table("fml")`` returns one.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    algorithm: str = "fml"  # a registered name (fedmutual.register_algorithm) or an import string "pkg.module:Class"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    partition: str = "shards:2"
    task: str | list[str] = "classes"  # what clients learn: classes, binary:C1,C2,..., groups:A,B|C|... (data/tasks.py); a list: per client, round-robin
    clients: int = Field(default=5, ge=1)
    model: str | list[str] = "lenet5"  # one name, "a,b,c" (round-robin over clients) or a list, one per client
    global_model: str | None = None  # the global (and meme) architecture, "name" or "name:part"; default: the clients' model
    rounds: int = Field(default=10, ge=1)
    local_epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    lr_schedule: Literal["constant", "step"] = "constant"
    optimizer: Literal["sgd", "adam"] = "sgd"  # adam uses lr and weight_decay; momentum is SGD's only
    local_data: Literal["partition", "folds"] = "partition"  # folds: a fresh stratified fold of the pool per round
    sample_fraction: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    limit_train: int | None = Field(default=None, ge=1)
    limit_test: int | None = Field(default=None, ge=1)
    val_size: int | None = Field(default=None, ge=1)
    val_source: Literal["auto", "test", "train"] = "auto"  # auto: the algorithm's own default (DFML's 80:20 split: "train")
    val_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of each client's data held out when val_source = "train"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    engine: Literal["auto", "stacked", "loop"] = "auto"
    client_states: Literal["memory", "disk"] = "memory"  # disk: each client's state in a file between rounds (many clients)
    eval_every: int = Field(default=1, ge=1)
    eval_clients: int | None = Field(default=20, ge=1)  # clients measured per evaluated round (a seeded sample); None: all
    eval_batch_size: int = Field(default=256, ge=1)  # 256 ran 1.5x faster than 1000 for conv models (cache)
    out: str = "runs"
    name: str | None = None
    progress: bool = True
    public: PublicConfig = Field(default_factory=PublicConfig)
    checkpoint_every: int = Field(default=1, ge=0)  # write a checkpoint every N rounds; 0: never
    checkpoint_keep: int = Field(default=2, ge=1)  # newest checkpoints kept (older ones are a fallback)
    max_message_mb: float = Field(default=1024.0, gt=0)  # received messages larger than this are rejected unread
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)

    @model_validator(mode="before")
    @classmethod
    def _algorithm_tables(cls, data: Any) -> Any:
        """Resolve ``algorithm`` through the registry and validate every algorithm table with its ``Settings``."""
        if not isinstance(data, dict):
            return data
        from fedmutual.registry import ALGORITHMS, canonical

        data = dict(data)
        name = data.get("algorithm", cls.model_fields["algorithm"].default)
        if not isinstance(name, str):
            raise ValueError(f"algorithm: expected a name or an import string, got {name!r}")
        try:
            chosen = ALGORITHMS.get(name)
        except FedmutualError as e:
            raise ValueError(f"algorithm: {e}") from None
        data["algorithm"] = canonical(name)
        tables: dict[str, type] = {}
        for entry in [*(ALGORITHMS.get(n) for n in ALGORITHMS.names()), chosen]:
            if getattr(entry, "Settings", None) is not None:
                tables.setdefault(entry.name, entry)
        for key in [k for k in data if k not in cls.model_fields]:
            if key not in tables:
                raise ValueError(f"{key}: unknown key")
        defaults = {e.name for e in (ALGORITHMS.get(n) for n in ALGORITHMS.builtin_names()) if getattr(e, "Settings", None)}
        for key, entry in tables.items():
            if key not in data and key not in defaults and entry is not chosen:
                continue  # another plug-in's table appears only when it is given
            value = data.get(key, {})
            if isinstance(value, entry.Settings):
                continue
            if isinstance(value, dict):
                for old, new in _MOVED_KEYS.get(key, {}).items():
                    if old in value:
                        raise ValueError(f"{key}.{old}: this setting moved to {new}")
            try:
                data[key] = entry.Settings.model_validate(value)
            except ValidationError as e:
                raise ValueError("\n  ".join(_error_lines(e, key))) from None
        return data

    def table(self, name: str) -> Any:
        """The settings of algorithm ``name`` (its ``Settings`` model), e.g. ``cfg.table("fml").alpha``."""
        extra = self.__pydantic_extra__ or {}
        if name not in extra:
            raise ConfigError(f"the config has no [{name}] table; known tables: {', '.join(extra) or 'none'}")
        return extra[name]

    def tables(self) -> list[str]:
        """The names of the algorithm tables this config holds."""
        return list(self.__pydantic_extra__ or {})

    def algorithm_class(self) -> Any:
        """The class of the configured algorithm (from the registry)."""
        from fedmutual.registry import ALGORITHMS

        return ALGORITHMS.get(self.algorithm)

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        # "iid", "shards:P", "dirichlet:A", "indices:PATH", a registered partitioner's "name[:arg]" or an import string
        from fedmutual.data.partition import parse_partition

        try:
            parse_partition(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | list[str]) -> str | list[str]:
        from fedmutual.data.tasks import parse_task

        try:
            if isinstance(v, list):
                if not v:
                    raise ConfigError("an empty list; give one task, or one per client")
                specs = [parse_task(t).spec for t in v]
                return specs[0] if len(specs) == 1 else specs
            return parse_task(v).spec
        except ConfigError as e:
            raise ValueError(str(e)) from None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | list[str]) -> str | list[str]:
        # registered names in canonical (lower) case; import strings ("pkg.nets:Net") keep their case
        from fedmutual.models import MODELS
        from fedmutual.registry import canonical, is_import_string

        names = [canonical(n) for n in (v.split(",") if isinstance(v, str) else v)]
        bad = []
        for n in names:
            try:
                MODELS.get(n)
            except ConfigError as e:
                if is_import_string(n) or not str(e).startswith("unknown model"):
                    raise ValueError(str(e)) from None  # an import or a plug-in failed: say why
                bad.append(n)
        if not names or bad:
            raise ValueError(f"unknown model {', '.join(map(repr, bad or ['(empty)']))}; allowed: {', '.join(sorted(n for n in MODELS.names() if ':' not in n))}, "
                             "or an import string such as 'mypackage.nets:Net'")
        return names[0] if len(names) == 1 else names

    @field_validator("global_model")
    @classmethod
    def _global_model(cls, v: str | None) -> str | None:
        from fedmutual.models import parse_model_spec

        if v is None:
            return None
        try:
            name, part = parse_model_spec(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return name if part is None else f"{name}:{part}"

    def model_names(self) -> list[str]:
        """The architecture of each client's model: a list given per client, or names assigned round-robin."""
        names = [self.model] if isinstance(self.model, str) else list(self.model)
        return [names[k % len(names)] for k in range(self.clients)]

    def task_specs(self) -> list[str]:
        """Each client's task spec: one for everyone, or a list assigned round-robin (one per client)."""
        specs = [self.task] if isinstance(self.task, str) else list(self.task)
        return [specs[k % len(specs)] for k in range(self.clients)]

    @property
    def model_label(self) -> str:
        """The model setting as one short string, e.g. ``lenet5``, ``mlp+lenet5+cnn1`` or, for FML with
        a global model of its own, ``mlp+cnn1-g-cnn2-encoder``."""
        label = self.model if isinstance(self.model, str) else "+".join(self.model)
        if self.global_model and self.algorithm_class().uses_global_model:
            label += "-g-" + self.global_model.replace(":", "-")
        return label

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.model_names())) > 1

    def resolved_val_source(self) -> str:
        """Where clients' validation splits come from: ``val_source``, or the algorithm's default for ``auto``."""
        if self.val_source != "auto":
            return self.val_source
        return str(self.algorithm_class().val_source)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        # a registered name in canonical (lower) case, or an import string kept as written
        from fedmutual.data.datasets import DATASETS
        from fedmutual.registry import canonical, is_import_string

        v = canonical(v)
        try:
            DATASETS.get(v)
        except ConfigError as e:
            if is_import_string(v) or not str(e).startswith("unknown dataset"):
                raise ValueError(str(e)) from None
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(n for n in DATASETS.names() if ':' not in n)}, "
                             "or an import string such as 'mypackage.data:load'") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.limit_train is not None and self.clients > self.limit_train:
            raise ValueError(f"clients: {self.clients} clients but limit_train is {self.limit_train}; "
                             "every client needs at least one sample, so use at most limit_train clients")
        bad = [k for k in self.attack.clients if not 0 <= k < self.clients]
        if bad:
            raise ValueError(f"attack.clients: {bad} are not clients; allowed: 0..{self.clients - 1}")
        if self.attack.count > self.clients:
            raise ValueError(f"attack.count: {self.attack.count} attackers but only {self.clients} clients")
        per_round = self.clients if self.sample_fraction >= 1 else max(1, int(round(self.sample_fraction * self.clients)))
        if self.faults.min_replies > per_round:
            raise ValueError(f"faults.min_replies: {self.faults.min_replies}, but at most {per_round} clients take part in a round "
                             f"({self.clients} clients, sample_fraction {self.sample_fraction}); every round would be skipped")
        return self

    def to_dict(self, all_tables: bool = False) -> dict[str, Any]:
        """The config as JSON values: what ``config.json`` holds, and what :func:`validate` reads back.

        It holds the built-in algorithms' tables and the configured algorithm's; tables of other plug-in
        algorithms are left out (``all_tables`` keeps them), so that the record reruns in a process that never
        imported those plug-ins.
        """
        data = self.model_dump(mode="json")
        if not all_tables:
            from fedmutual.registry import ALGORITHMS

            keep = {ALGORITHMS.get(n).name for n in ALGORITHMS.builtin_names()} | {self.algorithm_class().name}
            for key in self.tables():
                if key not in keep:
                    data.pop(key, None)
        return data


#: settings that moved to another table, for a plain message instead of "unknown key"
_MOVED_KEYS: dict[str, dict[str, str]] = {
    "dmlfl": {"public": "public.mode", "public_size": "public.size", "public_labels": "public.labels",
              "public_dataset": "public.dataset"},
}


def _describe(err: ValidationError) -> str:
    return "invalid configuration:\n  " + "\n  ".join(_error_lines(err))


def _error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            msg = f"invalid value {e.get('input')!r}; allowed: {allowed}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        else:
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"{key}: {msg}" if key else msg)  # a cross-field message names its keys itself
    return lines


def validate(data: dict[str, Any]) -> Config:
    """Build a Config from a nested dict, turning validation errors into one plain ConfigError."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a nested dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        if p.suffix == ".json":
            return json.loads(p.read_text())
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse config file {str(p)!r}: {e}") from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is read as TOML, else as a string."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set expects dotted.key=value, got {assignment!r}")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None or not isinstance(child, dict):
            child = {} if child is None else {"kind": "constant", "value": child} if isinstance(child, (int, float)) else child
            node[p] = child
        node = child
    node[parts[-1]] = _parse_value(text.strip())


def build_config(file: str | Path | None = None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> Config:
    """Defaults <- file <- flat overrides (command-line flags) <- ``--set`` assignments."""
    data: dict[str, Any] = load_file(file) if file else {}
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    for s in sets or []:
        apply_override(data, s)
    return validate(data)

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

from fedmutual.errors import ConfigError
from fedmutual.schedules import Schedule

ALGORITHMS = ("fedavg", "fedprox", "local", "independent", "fml", "dfml", "dfedavg", "dmlfl", "asyncfl")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FMLConfig(_Strict):
    """FML (Shen et al. 2023): alpha weighs the personalized model's CE, beta the meme's."""

    alpha: Schedule = Field(default_factory=lambda: Schedule(value=0.5))
    beta: Schedule = Field(default_factory=lambda: Schedule(value=0.5))
    weighted: bool = False  # the paper averages memes uniformly; True weighs by client samples
    temperature: float = Field(default=1.0, gt=0)
    # widths of hidden layers of each client's adaptor head when the global model is partial; [] = one FC layer
    adaptor_hidden: list[int] = Field(default_factory=list)

    @field_validator("adaptor_hidden")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError(f"hidden widths must be >= 1, got {v}")
        return v


class FedAvgConfig(_Strict):
    weighting: Literal["samples", "uniform"] = "samples"


class FedProxConfig(_Strict):
    mu: float = Field(default=0.01, ge=0)
    weighting: Literal["samples", "uniform"] = "samples"


class DFMLConfig(_Strict):
    """DFML (Khalil et al. 2024): serverless mutual learning at a rotating aggregator."""

    participants: int | None = Field(default=None, ge=1)  # m clients per round; default min(10, K)
    alpha_max: float = Field(default=0.8, ge=0, le=1)
    period: int = Field(default=10, ge=1)
    shape: Literal["rise", "symmetric", "constant"] = "rise"
    wsm: bool = True  # re-weighted softmax CE (Legate et al. 2023); False = plain CE
    peak_models: bool = True  # False: a client's deployable model is its current model
    local_train_before_send: bool = False
    temperature: float = Field(default=1.0, gt=0)


class DFedAvgConfig(_Strict):
    """Decentralized FedAvg: a random aggregator averages the participants' locally trained models."""

    participants: int | None = Field(default=None, ge=1)  # default min(10, K)
    wsm: bool = False
    weighting: Literal["samples", "uniform"] = "samples"


def parse_compression(spec: str) -> tuple[str, int]:
    """``"none"``, ``"fp16"`` or ``"topk:K"`` (K >= 1) -> (kind, K); raises ValueError naming the forms."""
    text = spec.strip().lower()
    if text in ("none", "fp16"):
        return text, 0
    kind, _, arg = text.partition(":")
    if kind == "topk" and arg.strip().isdigit() and int(arg) >= 1:
        return "topk", int(arg)
    raise ValueError(f"invalid compression {spec!r}; allowed: 'none', 'fp16' or 'topk:K' with an integer K >= 1 (e.g. 'topk:3')")


class DMLFLConfig(_Strict):
    """DML-FL (Gupta 2025): clients share predictions on a public set, never weights."""

    public: Literal["dynamic", "static"] = "dynamic"  # dynamic: a fresh stratified fold every round
    public_size: int | None = Field(default=None, ge=1)  # default: a fold, training samples // (clients + 1)
    public_labels: bool = True  # False: the public set is unlabelled and trained with the KL only
    public_dataset: str | None = None  # draw the public set from this dataset instead of carving it from the run's
    collab_epochs: int = Field(default=1, ge=1)  # epochs on the public set; local epochs are `local_epochs`
    kl: Literal["auto", "softmax", "bernoulli", "faithful"] = "auto"  # auto: softmax, or bernoulli on a binary task
    kl_weight: float = Field(default=1.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    compression: str = "none"  # "none" (float32), "fp16", or "topk:K" (K largest probabilities + their classes)
    common_init: bool = True  # clients with the same architecture start from the same weights

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str) -> str:
        parse_compression(v)
        return v.strip().lower()

    @field_validator("public_dataset")
    @classmethod
    def _public_dataset(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from fedmutual.data.datasets import DATASETS

        key = v.lower().replace("_", "-")
        if key not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(DATASETS)}")
        return key


class AsyncFLConfig(_Strict):
    """The DML-FL authors' asynchronous weight updating: accuracy-weighted layers, dense or conv by round."""

    dense_every: int = Field(default=3, ge=1)  # rounds t with t % dense_every == 0 (1-based) update dense layers


class FaultsConfig(_Strict):
    """Simulated failing clients, drawn per round and client from the run seed (see fedmutual.faults)."""

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
    """Everything that defines a run. Defaults follow the FML paper where it speaks."""

    algorithm: Literal["fedavg", "fedprox", "local", "independent", "fml", "dfml", "dfedavg", "dmlfl", "asyncfl"] = "fml"
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
    val_source: Literal["auto", "test", "train"] = "auto"  # auto: "train" for dfml/dfedavg, else "test"
    val_fraction: float = Field(default=0.2, gt=0, lt=1)  # share of each client's data held out when val_source = "train"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    engine: Literal["auto", "stacked", "loop"] = "auto"
    eval_every: int = Field(default=1, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)  # 256 ran 1.5x faster than 1000 for conv models (cache)
    out: str = "runs"
    name: str | None = None
    progress: bool = True
    fml: FMLConfig = Field(default_factory=FMLConfig)
    fedavg: FedAvgConfig = Field(default_factory=FedAvgConfig)
    fedprox: FedProxConfig = Field(default_factory=FedProxConfig)
    dfml: DFMLConfig = Field(default_factory=DFMLConfig)
    dfedavg: DFedAvgConfig = Field(default_factory=DFedAvgConfig)
    dmlfl: DMLFLConfig = Field(default_factory=DMLFLConfig)
    asyncfl: AsyncFLConfig = Field(default_factory=AsyncFLConfig)
    checkpoint_every: int = Field(default=1, ge=0)  # write a checkpoint every N rounds; 0: never
    checkpoint_keep: int = Field(default=2, ge=1)  # newest checkpoints kept (older ones are a fallback)
    max_message_mb: float = Field(default=1024.0, gt=0)  # received messages larger than this are rejected unread
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
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
        from fedmutual.models import ZOO

        names = [n.strip().lower() for n in (v.split(",") if isinstance(v, str) else v)]
        if not names or any(n not in ZOO for n in names):
            bad = [n for n in names if n not in ZOO] or ["(empty)"]
            raise ValueError(f"unknown model {', '.join(map(repr, bad))}; allowed: {', '.join(sorted(ZOO))}")
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
        if self.global_model and self.algorithm == "fml":
            label += "-g-" + self.global_model.replace(":", "-")
        return label

    @property
    def heterogeneous(self) -> bool:
        return len(set(self.model_names())) > 1

    def resolved_val_source(self) -> str:
        if self.val_source != "auto":
            return self.val_source
        return "train" if self.algorithm in ("dfml", "dfedavg") else "test"

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        from fedmutual.data.datasets import DATASETS

        v = v.lower().replace("_", "-")
        if v not in DATASETS:
            raise ValueError(f"unknown dataset {v!r}; allowed: {', '.join(DATASETS)}")
        return v.lower()

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

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
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
    return "invalid configuration:\n  " + "\n  ".join(lines)


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

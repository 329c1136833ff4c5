"""Sweeps: a grid over config keys, times seeds, one run directory per point; resumable.

A sweep spec is a TOML file::

    name = "table1"                 # the sweep's directory, under the config's out (default runs/)
    config = "configs/quick.toml"   # optional base config file (relative to the spec)
    seeds = [0, 1, 2]
    [base]                          # config keys for every run, over the file's
    rounds = 20
    [grid]                          # every combination of these values (dotted keys for nested ones)
    algorithm = ["fedavg", "fml"]
    partition = ["iid", "shards:2"]

Each point's run is named from its grid values and seed (``algorithm=fml,partition=shards2,seed=1``), so a sweep
started again finds its runs: a completed run is skipped, a run with a checkpoint resumes from it, and a run that
stopped before its first checkpoint starts again. Runs go one at a time, or ``workers`` at a time, each in a process
of its own with ``threads = cores / workers`` unless the spec sets threads.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedmutual.config import apply_override, load_file, validate
from fedmutual.errors import ConfigError, FedmutualError
from fedmutual.experiment.runner import resume, run, slug
from fedmutual.report.runs import flatten


@dataclass
class Point:
    """One run of a sweep: its name, its grid values and seed, and its full config (JSON values)."""

    name: str
    values: dict[str, Any]
    seed: int
    config: dict[str, Any]


@dataclass
class Sweep:
    name: str
    dir: Path
    points: list[Point]


def _value_slug(v: Any) -> str:
    return slug(json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep spec and expand it into its points (every config is validated before anything runs)."""
    p = Path(path)
    try:
        spec = tomllib.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"sweep {p}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"sweep {p}: not valid TOML ({e})") from None
    return sweep_from_spec(spec, p)


def sweep_from_spec(spec: dict[str, Any], p: Path, out: str | Path | None = None) -> Sweep:
    """A sweep from a spec's tables (what the TOML file holds); ``p`` names it in messages and anchors its relative
    paths; ``out`` overrides the runs' parent directory."""
    unknown = sorted(set(spec) - {"name", "config", "seeds", "base", "grid"})
    if unknown:
        raise ConfigError(f"sweep {p}: unknown keys {', '.join(unknown)} (allowed: name, config, seeds, [base], [grid])")
    name = spec.get("name") or p.stem
    if not isinstance(name, str) or "/" in name:
        raise ConfigError(f"sweep {p}: name must be one word")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"sweep {p}: seeds must be a list of integers, e.g. seeds = [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"sweep {p}: seeds repeat a value")
    base: dict[str, Any] = {}
    if spec.get("config"):
        cfg_path = Path(spec["config"])
        base = load_file(cfg_path if cfg_path.is_absolute() else p.parent / cfg_path)
    base = json.loads(json.dumps(base))
    for k, v in flatten(spec.get("base") or {}).items():
        _set(base, k, v)
    if not isinstance(spec.get("grid") or {}, dict):
        raise ConfigError(f"sweep {p}: [grid] must be a table of key = [values]")
    grid = flatten(spec.get("grid") or {})
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"sweep {p}: grid.{k} must be a non-empty list of values")
    if "seed" in grid:
        raise ConfigError(f"sweep {p}: give seeds as seeds = [...], not in [grid]")
    keys = list(grid)
    points: list[Point] = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo))
        for seed in seeds:
            data = json.loads(json.dumps(base))
            for k, v in values.items():
                _set(data, k, v)
            data["seed"] = seed
            if out is not None:
                data["out"] = str(out)
            label = ",".join(f"{k}={_value_slug(v)}" for k, v in values.items())
            run_name = f"{label},seed={seed}" if label else f"seed={seed}"
            try:
                cfg = validate(data)
            except ConfigError as e:
                raise ConfigError(f"sweep {p}: point {run_name}: {e}") from None
            points.append(Point(run_name, values, seed, cfg.to_dict()))
    out = Path(points[0].config["out"]) if points else Path("runs")
    return Sweep(name, out / name, points)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a (dotted) key to a value, as ``--set key=value`` does."""
    if "." not in key:
        data[key] = value
        return
    apply_override(data, f"{key}={json.dumps(value)}")


def status(run_dir: Path) -> str:
    """``completed``, ``resumable`` (a checkpoint to continue from), ``partial`` (started, nothing to resume) or ``new``."""
    if not run_dir.exists():
        return "new"
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                return "completed"
        except (OSError, json.JSONDecodeError):
            pass
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("round-*")):
        return "resumable"
    return "partial"


def run_sweep(sweep: Sweep, workers: int = 1, quiet: bool = False, log: Callable[[str], None] | None = None) -> list[Path]:
    """Run every point of the sweep that is not complete yet; return the run directories, in the spec's order."""
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if workers < 1:
        raise ConfigError(f"--workers: {workers}; give 1 or more")
    sweep.dir.mkdir(parents=True, exist_ok=True)
    (sweep.dir / "sweep.json").write_text(json.dumps({"name": sweep.name, "points": [p.name for p in sweep.points]}, indent=1) + "\n")
    todo = []
    for p in sweep.points:
        state = status(sweep.dir / p.name)
        if state == "completed":
            continue
        todo.append((p, state))
    done = len(sweep.points) - len(todo)
    say(f"fedmutual: sweep {sweep.name}: {len(sweep.points)} runs, {done} already complete, {len(todo)} to run in {sweep.dir}")
    if workers == 1:
        for i, (p, state) in enumerate(todo, 1):
            say(f"fedmutual: sweep {sweep.name}: [{done + i}/{len(sweep.points)}] {p.name} ({state})")
            _run_point(sweep, p, state, quiet=True)
    else:
        _run_parallel(sweep, todo, workers, done, say)
    return [sweep.dir / p.name for p in sweep.points]


def _run_point(sweep: Sweep, p: Point, state: str, quiet: bool) -> None:
    run_dir = sweep.dir / p.name
    if state == "resumable":
        resume(run_dir, quiet=quiet)
        return
    if state == "partial":
        shutil.rmtree(run_dir)  # it stopped before its first checkpoint: nothing in it can be continued
    run(validate({**p.config, "out": str(sweep.dir), "name": p.name}), quiet=quiet)


def _run_parallel(sweep: Sweep, todo: list[tuple[Point, str]], workers: int, done: int, say: Callable[[str], None]) -> None:
    cores = os.cpu_count() or 1
    procs: list[tuple[Point, subprocess.Popen[bytes]]] = []
    queue = list(todo)
    failed: list[str] = []
    finished = done
    while queue or procs:
        while queue and len(procs) < workers:
            p, state = queue.pop(0)
            cfg = dict(p.config)
            if cfg.get("threads") is None:
                cfg["threads"] = max(1, cores // workers)
            spec = sweep.dir / f".{p.name}.json"
            spec.write_text(json.dumps(cfg))
            code = ("import sys, json; from pathlib import Path; from fedmutual.experiment.sweep import Point, Sweep, _run_point; "
                    "p = Point(**json.loads(sys.argv[1])); _run_point(Sweep('', Path(sys.argv[2]), []), p, sys.argv[3], True)")
            arg = json.dumps({"name": p.name, "values": p.values, "seed": p.seed, "config": cfg})
            log = open(sweep.dir / f".{p.name}.log", "ab")
            procs.append((p, subprocess.Popen([sys.executable, "-c", code, arg, str(sweep.dir), state], stdout=log, stderr=log)))
            log.close()
            spec.unlink(missing_ok=True)
        for item in list(procs):
            p, proc = item
            if proc.poll() is None:
                continue
            procs.remove(item)
            finished += 1
            if proc.returncode != 0:
                failed.append(p.name)
                say(f"fedmutual: sweep {sweep.name}: {p.name} failed (exit {proc.returncode}); see {sweep.dir / ('.' + p.name + '.log')}")
            else:
                say(f"fedmutual: sweep {sweep.name}: [{finished}/{len(sweep.points)}] {p.name} done")
        if procs:
            time.sleep(0.2)
    if failed:
        raise FedmutualError(f"sweep {sweep.name}: {len(failed)} runs failed ({', '.join(failed[:5])}); run the sweep again to retry them")

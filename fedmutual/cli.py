"""The ``fedmutual`` command line: run, compare and partition."""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Sequence

from fedmutual.errors import FedmutualError

# flag -> config key, for the flags shared by run and compare
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--algorithm", "algorithm", str, "{algorithms}, or an import string mypackage.module:Class"),
    ("--dataset", "dataset", str, "{datasets}, or an import string"),
    ("--data-dir", "data_dir", str, "directory holding the dataset files"),
    ("--partition", "partition", str, "iid | shards:P | dirichlet:A"),
    ("--task", "task", str, "classes | binary:C1,C2,... | groups:A,B|C|...: what the clients learn from the labels"),
    ("--clients", "clients", int, "number of clients K"),
    ("--model", "model", str, "{models} or an import string, or a,b,c assigned round-robin to the clients"),
    ("--global-model", "global_model", str, "FML's global/meme model: a zoo name, or a part such as cnn2:encoder (default: the clients' model)"),
    ("--rounds", "rounds", int, "communication rounds T"),
    ("--local-epochs", "local_epochs", int, "local epochs E per round"),
    ("--batch-size", "batch_size", int, "mini-batch size B"),
    ("--lr", "lr", float, "learning rate"),
    ("--seed", "seed", int, "run seed"),
    ("--limit-train", "limit_train", int, "seeded, class-stratified training subset of N samples"),
    ("--limit-test", "limit_test", int, "seeded, class-stratified test subset of N samples"),
    ("--device", "device", str, "cpu | cuda | auto"),
    ("--threads", "threads", int, "torch intra-op threads (default: available cores)"),
    ("--engine", "engine", str, "auto | stacked | loop: how client cohorts train (default auto)"),
    ("--out", "out", str, "parent directory of run directories (default runs/)"),
    ("--eval-every", "eval_every", int, "evaluate every N rounds, and always the last (default 1)"),
    ("--eval-clients", "eval_clients", int, "measure at most N clients' models per evaluated round, a seeded sample "
     "drawn each round; all of them at the last round (default 20)"),
    ("--name", "name", str, "run directory name (default: derived from the config and time)"),
    ("--checkpoint-every", "checkpoint_every", int, "write a checkpoint every N rounds, 0 for none (default 1)"),
]


def _help(text: str) -> str:
    """Fill the registries' current names into a help text (no list of names is written twice)."""
    if "{" not in text:
        return text
    from fedmutual.data.datasets import DATASETS
    from fedmutual.models import MODELS
    from fedmutual.registry import ALGORITHMS

    return text.format(algorithms=" | ".join(ALGORITHMS.names()), models=" | ".join(MODELS.names()),
                       datasets=" | ".join(DATASETS.names()))


def _add_run_options(p: argparse.ArgumentParser, with_algorithm: bool = True, skip: tuple[str, ...] = ()) -> None:
    p.add_argument("--config", help="TOML or JSON config file (a run's config.json reproduces it)")
    for flag, key, typ, help_ in _FLAGS:
        if (flag == "--algorithm" and not with_algorithm) or flag in skip:
            continue
        p.add_argument(flag, dest=key, type=typ, default=None, help=_help(help_))
    p.add_argument("--download", action="store_true", default=None, help="download the dataset into the cache if it is missing")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bars")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set fml.alpha=0.3 (repeatable)")


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    keys = [k for _, k, _, _ in _FLAGS] + ["download", "progress"]
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from fedmutual.registry import ALGORITHMS

    parser = argparse.ArgumentParser(prog="fedmutual", description="Federated mutual learning and its baselines. "
                                     f"Algorithms: {', '.join(ALGORITHMS.names())}; each runs on the in-process runtime.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser("run", help="run one experiment (default: FML on Fashion-MNIST, 5 clients, shards:2, LeNet5)")
    _add_run_options(p_run)
    p_run.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR from its last complete checkpoint, with DIR's config.json")
    p_cmp = sub.add_parser("compare", help="run several algorithms on the same partition and seed")
    p_cmp.add_argument("--algorithms", default="fedavg,fedprox,fml", help="comma-separated algorithms (default fedavg,fedprox,fml)")
    _add_run_options(p_cmp, with_algorithm=False)
    for p in (p_run, p_cmp):
        p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                       help="run once per seed (e.g. 0,1,2) under one directory, then report mean ± sd over the seeds")
    p_sw = sub.add_parser("sweep", help="run a grid of configs × seeds from a spec file; resumable")
    p_sw.add_argument("spec", help="sweep spec (TOML): name, config, seeds, [base], [grid]")
    p_sw.add_argument("--workers", type=int, default=1, help="runs at a time, each in its own process (default 1)")
    p_sw.add_argument("--no-report", action="store_true", help="do not write the report when the sweep is complete")
    p_rp = sub.add_parser("reproduce", help="run the papers' claims as sweeps over seeds and write the claims report")
    p_rp.add_argument("--quick", action="store_true", help="the same pipeline on tiny subsets, in minutes (checks the plumbing only)")
    p_rp.add_argument("--out", default="runs/reproduce", help="where the sweeps and claims.md go (default runs/reproduce)")
    p_rp.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
    p_rp.add_argument("--docs", default=None, metavar="results.md", help="also rewrite the claims section of this file")
    p_rp.add_argument("--only", default=None, metavar="CLAIM,...", help="only these claims (table1, oscillation, dh, mh-oh, dfml, dmlfl)")
    p_rep2 = sub.add_parser("report", help="tidy CSVs, mean ± sd tables, paired differences and curves over run directories")
    p_rep2.add_argument("dirs", nargs="+", help="run directories, or directories holding them (searched recursively)")
    p_rep2.add_argument("--out", default=None, help="where to write the report (default: DIR/report for one DIR, else report/)")
    p_part = sub.add_parser("partition", help="show how a partition splits the labels among clients, and save a heat map")
    for flag, key, typ, help_ in _FLAGS:
        if key in ("dataset", "data_dir", "partition", "clients", "seed", "limit_train", "limit_test", "out"):
            p_part.add_argument(flag, dest=key, type=typ, default=None, help=_help(help_))
    p_part.add_argument("--config", help="TOML or JSON config file")
    p_part.add_argument("--download", action="store_true", default=None)
    p_part.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p_part.add_argument("--png", default=None, help="heat map path (default OUT/partition-<spec>-K<clients>-s<seed>.png)")
    p_cl = sub.add_parser("clients", help="each personalized model under FML against the same model trained alone (tables and Fig. 5/6-style figures)")
    p_cl.add_argument("fml_run", help="run directory of the FML run")
    p_cl.add_argument("alone_run", help="run directory of the independent (or local) run on the same data")
    p_cl.add_argument("--out", default=None, help="where clients.md and the figures go (default: the FML run directory)")
    p_fl = sub.add_parser("flower", help="deploy on Flower: one SuperLink, a SuperNode per client")
    fl_sub = p_fl.add_subparsers(dest="flower_command")
    p_app = fl_sub.add_parser("app", help="write a runnable Flower app for a config (then: flwr run DIR fedmutual)")
    p_app.add_argument("dir", help="directory of the app (created)")
    _add_run_options(p_app)
    p_app.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink's address HOST:PORT for `flwr run` (default 127.0.0.1:9093)")
    p_app.add_argument("--root-certificates", default=None, metavar="CA.crt", help="the CA certificate that signed the SuperLink's TLS certificate")
    p_app.add_argument("--insecure", action="store_true", help="connect without TLS (a trial on one machine only)")
    p_peer = sub.add_parser("peer", help="take part in a federation without a server (dfml, dfedavg) as one peer")
    _add_run_options(p_peer, skip=("--data-dir",))
    p_peer.add_argument("--peers", required=True, metavar="peers.toml", help="the federation: its name, the CA, every peer's address")
    p_peer.add_argument("--id", dest="peer_id", type=int, required=True, metavar="K", help="the client this peer is")
    p_peer.add_argument("--data-dir", dest="peer_data_dir", default=None, metavar="DIR",
                        help="a dataset directory of this peer's own (default: its share of the config's dataset)")
    p_peer.add_argument("--timeout", type=float, default=120.0, help="deadline of one request to another peer, s (default 120)")
    p_peer.add_argument("--round-timeout", type=float, default=600.0,
                        help="how long to wait for a round's aggregator before skipping the round, s (default 600)")
    p_peer.add_argument("--wait", type=float, default=120.0, help="how long to wait for the other peers before round 1, s (default 120)")
    p_rep = sub.add_parser("peer-report", help="merge the peers' run directories into one run's metrics.jsonl and summary.json")
    p_rep.add_argument("dirs", nargs="+", help="the peers' run directories (OUT/FEDERATION/peerK)")
    p_rep.add_argument("--out", default=None, help="where to write the merged run (default: the peers' parent directory)")
    return parser


def _parse_seeds(text: str) -> list[int]:
    from fedmutual.config import ConfigError

    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: give distinct integers, e.g. --seeds 0,1,2")
    return seeds


def _cmd_seeds(ns: argparse.Namespace, cfg: Any) -> None:
    """run/compare once per seed under one directory, then the report over them."""
    from datetime import datetime
    from pathlib import Path

    from fedmutual.config import validate
    from fedmutual.experiment.runner import slug
    from fedmutual.report.runs import write_report

    seeds = _parse_seeds(ns.seeds)
    what = slug(cfg.algorithm) if ns.command == "run" else "compare"
    parent = Path(cfg.out) / (cfg.name or f"{what}-{slug(cfg.dataset)}-{slug(cfg.partition)}-{slug(cfg.model_label)}-"
                                          f"seeds{'_'.join(map(str, seeds))}-{datetime.now():%Y%m%d-%H%M%S}")
    for seed in seeds:
        print(f"== seed {seed} ==", file=sys.stderr, flush=True)
        one = validate({**cfg.to_dict(all_tables=True), "seed": seed, "out": str(parent), "name": f"seed{seed}"})
        if ns.command == "run":
            from fedmutual.experiment.runner import run

            run(one)
        else:
            from fedmutual.experiment.compare import compare

            compare(one, [a.strip() for a in ns.algorithms.split(",") if a.strip()])
    out = write_report([parent], parent / "report")
    print((out / "report.md").read_text())
    print(f"report: {out}")


def _cmd_sweep(ns: argparse.Namespace) -> None:
    from fedmutual.experiment.sweep import load_sweep, run_sweep
    from fedmutual.report.runs import write_report

    sweep = load_sweep(ns.spec)
    run_sweep(sweep, workers=ns.workers)
    if not ns.no_report:
        out = write_report([sweep.dir], sweep.dir / "report")
        print(f"sweep {sweep.name}: {len(sweep.points)} runs in {sweep.dir}; report: {out / 'report.md'}")


def _cmd_report(ns: argparse.Namespace) -> None:
    from pathlib import Path

    from fedmutual.report.runs import write_report

    out = ns.out or (str(Path(ns.dirs[0]) / "report") if len(ns.dirs) == 1 else "report")
    d = write_report(ns.dirs, out)
    print(f"report: {d / 'report.md'}, {d / 'rounds.csv'}, {d / 'clients.csv'}, {d / 'curves.png'}")


def _cmd_peer(ns: argparse.Namespace) -> None:
    from fedmutual.config import build_config
    from fedmutual.deploy.peer import run_peer

    cfg = build_config(ns.config, _overrides(ns), ns.sets)
    d = run_peer(cfg, ns.peers, ns.peer_id, ns.peer_data_dir, timeout=ns.timeout, round_timeout=ns.round_timeout, wait=ns.wait)
    print(f"peer {ns.peer_id}: run directory {d}")


def _cmd_peer_report(ns: argparse.Namespace) -> None:
    from fedmutual.deploy.peer import merge_reports
    from fedmutual.report.metrics import read_metrics

    d = merge_reports(ns.dirs, ns.out)
    rows = read_metrics(d / "metrics.jsonl")
    print(f"merged {len(ns.dirs)} peers, {len(rows)} rounds: {d / 'metrics.jsonl'}, {d / 'summary.json'}")


def _cmd_flower(ns: argparse.Namespace) -> None:
    from fedmutual.config import ConfigError, build_config
    from fedmutual.deploy.app import CONNECTION, write_app

    if ns.flower_command != "app":
        raise ConfigError("fedmutual flower: give a subcommand: app")
    cfg = build_config(ns.config, _overrides(ns), ns.sets)
    cfg.algorithm_class()  # an unknown algorithm is refused before anything is written
    d = write_app(cfg, ns.dir, ns.superlink, ns.root_certificates, ns.insecure)
    print(f"Flower app for {cfg.algorithm} ({cfg.clients} clients, {cfg.rounds} rounds) in {d}")
    print(f"  1. add {d / 'superlink.toml'} to $FLWR_HOME/config.toml (default ~/.flwr/config.toml)")
    print(f"  2. start each client's SuperNode with --node-config \"partition-id=K num-partitions={cfg.clients}\"")
    print(f"  3. flwr run {d} {CONNECTION}   (then: flwr ls {CONNECTION} --format json for its status)")


def _cmd_clients(ns: argparse.Namespace) -> None:
    from pathlib import Path

    from fedmutual.config import load_file, validate
    from fedmutual.experiment.compare import per_client_report
    from fedmutual.errors import ConfigError
    from fedmutual.report.metrics import read_metrics

    runs = [Path(ns.fml_run), Path(ns.alone_run)]
    for r in runs:
        if not (r / "metrics.jsonl").is_file() or not (r / "config.json").is_file():
            raise ConfigError(f"{r}: not a run directory (needs metrics.jsonl and config.json)")
    cfg = validate(load_file(runs[0] / "config.json"))
    out = Path(ns.out) if ns.out else runs[0]
    out.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.dataset}, {cfg.partition}, {cfg.clients} clients, {cfg.model_label}"
    text = per_client_report(cfg, read_metrics(runs[0] / "metrics.jsonl"), read_metrics(runs[1] / "metrics.jsonl"), out, title)
    (out / "clients.md").write_text(text)
    print(text)
    print(f"figures: {out / 'clients.png'}, {out / 'clients-curves.png'}")


def _cmd_partition(ns: argparse.Namespace) -> None:
    from pathlib import Path

    from fedmutual.config import build_config
    from fedmutual.data import format_label_table, label_table
    from fedmutual.experiment.data import prepare_data
    from fedmutual.report.heatmap import save_label_heatmap

    over = {k: getattr(ns, k) for k in ("dataset", "data_dir", "partition", "clients", "seed", "limit_train", "limit_test", "out", "download") if getattr(ns, k, None) is not None}
    cfg = build_config(ns.config, over, ns.sets)
    data = prepare_data(cfg)
    table = label_table(data.parts, data.train_y.numpy(), data.dataset.num_classes)
    print(f"{cfg.dataset}, {cfg.partition}, {cfg.clients} clients, seed {cfg.seed}: training labels per client")
    print(format_label_table(table, data.dataset.classes))
    png = Path(ns.png) if ns.png else Path(cfg.out) / f"partition-{cfg.dataset}-{cfg.partition.replace(':', '')}-K{cfg.clients}-s{cfg.seed}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    save_label_heatmap(table, png, data.dataset.classes, title=f"{cfg.dataset} · {cfg.partition} · K={cfg.clients} · seed {cfg.seed}")
    print(f"heat map: {png}")


def _one_line(e: BaseException) -> str:
    """An exception as one plain line: its type and its message."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def _cmd_reproduce(ns: argparse.Namespace) -> None:
    from fedmutual.experiment.claims import reproduce

    only = [c.strip() for c in ns.only.split(",") if c.strip()] if ns.only else None
    path = reproduce("quick" if ns.quick else "full", ns.out, ns.workers, ns.docs, only=only)
    print(path.read_text())
    print(f"claims report: {path}")


#: The commands that do not build a run config from the run options (run and compare do).
_COMMANDS = {"partition": _cmd_partition, "clients": _cmd_clients, "flower": _cmd_flower, "peer": _cmd_peer, "peer-report": _cmd_peer_report,
             "sweep": _cmd_sweep, "report": _cmd_report, "reproduce": _cmd_reproduce}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedmutual`` and ``python -m fedmutual``; returns the exit status."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        ns = parser.parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    try:
        if ns.command == "run" and ns.resume is not None:
            from fedmutual.config import ConfigError
            from fedmutual.experiment.runner import resume

            given = [f for f, k, _, _ in _FLAGS if getattr(ns, k, None) is not None] + (["--config"] if ns.config else []) + \
                (["--set"] if ns.sets else []) + (["--download"] if ns.download else []) + (["--no-progress"] if ns.progress is False else [])
            if given:
                raise ConfigError(f"--resume continues a run with the config in {ns.resume}/config.json; "
                                  f"drop {', '.join(given)} (to change settings, start a new run)")
            resume(ns.resume)
            return 0
        own = _COMMANDS.get(ns.command)
        if own is not None:
            own(ns)
            return 0
        from fedmutual.config import build_config

        cfg = build_config(ns.config, _overrides(ns), ns.sets)
        if ns.seeds is not None:
            _cmd_seeds(ns, cfg)
            return 0
        if ns.command == "run":
            from fedmutual.experiment.runner import run

            run(cfg)
        else:
            from fedmutual.experiment.compare import compare

            compare(cfg, [a.strip() for a in ns.algorithms.split(",") if a.strip()])
        return 0
    except FedmutualError as e:
        if ns.debug:
            traceback.print_exc()
        print(f"fedmutual: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the machine refused (a full disk, a read-only directory, permissions): not a bug in fedmutual
        if ns.debug:
            traceback.print_exc()
        print(f"fedmutual: error: {_one_line(e)}", file=sys.stderr)
        return FedmutualError.exit_code
    except KeyboardInterrupt:
        print("fedmutual: interrupted; metrics of completed rounds are on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

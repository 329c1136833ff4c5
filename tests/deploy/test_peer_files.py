"""peers.toml, the merge of the peers' rows into one run, and the peer command's refusals (no processes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmutual import Config
from fedmutual.cli import main
from fedmutual.deploy.peer import load_peers, merge_reports
from fedmutual.errors import ConfigError


def _peers(tmp: Path, body: str) -> Path:
    p = tmp / "peers.toml"
    p.write_text(body)
    return p


GOOD = """federation = "fed"
ca = "certs/ca.crt"
[[peer]]
id = 0
address = "127.0.0.1:7000"
cert = "certs/peer0.crt"
key = "certs/peer0.key"
[[peer]]
id = 1
address = "10.0.0.2:7000"
"""


def test_peers_file_paths_are_relative_to_it(tmp_path: Path) -> None:
    peers = load_peers(_peers(tmp_path, GOOD))
    assert peers.federation == "fed" and peers.ca == tmp_path / "certs" / "ca.crt"
    assert peers.peers[0].key == tmp_path / "certs" / "peer0.key" and peers.peers[1].cert is None
    cfg = Config(algorithm="dfml", clients=2)
    assert peers.check(cfg, 0).address == "127.0.0.1:7000"
    with pytest.raises(ConfigError, match="peer 1 needs cert and key"):
        peers.check(cfg, 1)
    with pytest.raises(ConfigError, match="the config has 3 clients"):
        peers.check(Config(algorithm="dfml", clients=3), 0)


@pytest.mark.parametrize("body, message", [
    ("federation = 'f'\nca = 'c'\n", "list the peers"),
    ("ca = 'c'\n[[peer]]\nid = 0\naddress = 'h:1'\n", "federation must name the run"),
    ("federation = 'f'\n[[peer]]\nid = 0\naddress = 'h:1'\n", "ca = the CA certificate"),
    ("federation = 'f'\nca = 'c'\n[[peer]]\nid = 0\naddress = 'nohost'\n", "address must be HOST:PORT"),
    ("federation = 'f'\nca = 'c'\n[[peer]]\nid = 0\naddress = 'h:1'\n[[peer]]\nid = 0\naddress = 'h:2'\n", "listed twice"),
    ("federation = 'f'\nca = 'c'\nport = 3\n", "unknown keys port"),
    ("federation = 'f'\nca = 'c'\n[[peer]]\nid = 0\naddress = 'h:1'\nhost = 'x'\n", "unknown keys host"),
    ("federation = [", "not valid TOML"),
])
def test_a_bad_peers_file_is_refused_with_what_to_fix(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_peers(_peers(tmp_path, body))


def test_the_peer_command_refuses_a_method_with_a_server_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "peer0.crt", "peer0.key"):
        (certs / name).write_text("x")
    peers = _peers(tmp_path, GOOD)
    code = main(["peer", "--algorithm", "fedavg", "--clients", "2", "--limit-train", "200", "--limit-test", "100",
                 "--out", str(tmp_path / "runs"), "--peers", str(peers), "--id", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "coordinated by a server" in err[-1]
    code = main(["peer", "--algorithm", "dfml", "--clients", "2", "--peers", str(tmp_path / "none.toml"), "--id", "0"])
    assert code == 2 and "none.toml" in capsys.readouterr().err


def _write_peer(d: Path, k: int, cfg: Config, rows: list[dict[str, Any]]) -> Path:
    d.mkdir(parents=True)
    (d / "peer.json").write_text(json.dumps({"peer": k, "federation": "fed", "config": cfg.to_dict()}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_the_merge_takes_each_client_from_its_peer_and_the_round_from_its_aggregator(tmp_path: Path) -> None:
    cfg = Config(algorithm="dfml", clients=3, rounds=2)
    ok = {"dropped": [], "crashed": [], "late": [], "rejected": [], "skipped": False}
    base = {"participants": [0, 1, 2], "absent": False}
    p0 = [{**base, "round": 1, "peer": 0, "aggregator": 2, "test": 0.5, "val": 0.25, "extra": {"current": 0.4},
           "bytes_up": 10, "bytes_down": 20, "seconds": 1.0},
          {**base, "round": 2, "peer": 0, "aggregator": 1, "test": 0.75, "val": 0.5, "extra": {"current": 0.6},
           "bytes_up": 0, "bytes_down": 0, "seconds": 9.0}]
    p2 = [{**base, "round": 1, "peer": 2, "aggregator": 2, "test": 0.25, "val": 0.0, "extra": {"current": 0.2},
           "bytes_up": 20, "bytes_down": 10, "seconds": 2.0, "stats": {"alpha": 0.1, "train_loss": 1.5},
           "faults": {**ok, "late": [1]}},
          {**base, "round": 2, "peer": 2, "aggregator": 1, "absent": True, "bytes_up": 0, "bytes_down": 0, "seconds": 0.5}]
    dirs = [_write_peer(tmp_path / "fed" / "peer0", 0, cfg, p0), _write_peer(tmp_path / "fed" / "peer2", 2, cfg, p2)]
    out = merge_reports(dirs)
    assert out == tmp_path / "fed"
    r1, r2 = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    # round 1: peer 1 wrote nothing (down): its accuracies are None, its bytes 0; the means are over the others
    assert r1["client_acc_global_test"] == [0.5, None, 0.25] and r1["client_acc_global_test_mean"] == 0.375
    assert r1["personal_acc"] == [0.25, None, 0.0] and r1["personal_acc_mean"] == 0.125
    assert r1["current_acc_global_test"] == [0.4, None, 0.2] and r1["current_acc_global_test_mean"] == pytest.approx(0.3, abs=1e-12)
    assert r1["bytes_up_per_client"] == [10, 0, 20] and r1["bytes_up"] == 30 and r1["bytes_down"] == 30
    assert r1["alpha"] == 0.1 and r1["train_loss"] == 1.5 and r1["faults"]["late"] == [1] and r1["global_acc"] is None
    assert r1["seconds"] == 2.0
    # round 2: its aggregator (peer 1) wrote nothing: the round was skipped; peer 2 was absent
    assert r2["faults"]["skipped"] and r2["faults"]["aggregator_down"] == 1 and "alpha" not in r2
    assert r2["client_acc_global_test"] == [0.75, None, None] and r2["seconds"] == 9.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "partial" and summary["peers"] == [0, 2] and summary["total_bytes_up"] == 30
    assert (out / "accuracy.png").is_file()


def test_the_merge_refuses_peers_of_different_runs(tmp_path: Path) -> None:
    a = _write_peer(tmp_path / "a", 0, Config(algorithm="dfml", clients=2), [])
    b = _write_peer(tmp_path / "b", 1, Config(algorithm="dfml", clients=2, seed=3), [])
    with pytest.raises(ConfigError, match="another federation or config"):
        merge_reports([a, b])
    with pytest.raises(ConfigError, match="no peer.json"):
        merge_reports([tmp_path])

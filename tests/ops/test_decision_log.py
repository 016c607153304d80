"""The decision log: JSON lines, rotation, hashing, never blocking, never dropping silently."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from _ops_support import SONNET, MakeSidecar, stop
from prometheus_client import CollectorRegistry

from policy.decide import Request
from policy.pricing import Usage
from sidecar.client import SpendKeeperClient
from sidecar.config import load_config
from sidecar.decision_log import DecisionLog, hash_user, load_salt
from sidecar.ledger import AuthorizeResult
from sidecar.server import Sidecar


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _deny(i: int) -> tuple[Request, AuthorizeResult]:
    import datetime as dt

    req = Request(f"r-{i}", "acme", "carol@acme.com", "chat", SONNET, Usage(1000, 1000),
                  dt.datetime(2026, 11, 20, tzinfo=dt.UTC))
    result = AuthorizeResult(False, "USER_LIMIT", "over", 0, 18_000_000, (), None, "2026-11",
                             None, None, "v1", False, "USER_LIMIT")
    return req, result


def test_log_all_writes_every_decision_and_record_with_exact_costs(
        make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """decision_log_all: allows, denies and records, each with the policy version."""
    sidecar, target = make_sidecar(decision_log_all=True)
    with SpendKeeperClient(target, timeout=5.0) as client:
        client.authorize("a-1", "acme", "alice@acme.com", "claude_code", SONNET,
                         input_tokens=1000, max_output_tokens=2000)
        client.record("a-1", "acme", "alice@acme.com", "claude_code", SONNET,
                      input_tokens=1000, output_tokens=1000)
        client.authorize("b-1", "acme", "bob@acme.com", "claude_code", SONNET,
                         max_output_tokens=10)
    assert sidecar.decision_log.flush()
    # Read the metrics while the ledger is open (the registry also scrapes the ledger).
    assert sidecar.registry.get_sample_value("spendkeeper_decision_log_lines_total") == 3
    assert sidecar.registry.get_sample_value("spendkeeper_decision_log_dropped_total") == 0
    stop(sidecar)
    auth, record, denied = _lines(tmp_path / "decisions.jsonl")
    version = sidecar.holder.policy.version
    assert {k: auth[k] for k in ("event", "request_id", "org", "user", "product", "model",
                                 "decision", "reason", "verdict", "shadow", "cost",
                                 "reserved", "policy_version", "period")} == {
        "event": "authorize", "request_id": "a-1", "org": "acme", "user": "alice@acme.com",
        "product": "claude_code", "model": SONNET, "decision": "ALLOW",
        "reason": "WITHIN_LIMITS", "verdict": "WITHIN_LIMITS", "shadow": False,
        "cost": "0.033", "reserved": "0.033", "policy_version": version,
        "period": auth["period"]}
    assert str(auth["time"]).endswith("Z")
    assert (record["event"], record["decision"], record["cost"], record["user_type"]) == \
        ("record", "RECORD", "0.018", "chat_code")
    assert (denied["decision"], denied["reason"]) == ("DENY", "PRODUCT_NOT_ENTITLED")


def test_by_default_only_denies_are_logged_and_user_ids_can_be_hashed(
        make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """hash_user_ids: sha256 of the install's salt + the user id; the salt file is 0600."""
    sidecar, target = make_sidecar(hash_user_ids=True)
    with SpendKeeperClient(target, timeout=5.0) as client:
        for i in range(3):
            client.authorize(f"c-{i}", "acme", "carol@acme.com", "chat", SONNET,
                             input_tokens=1000, max_output_tokens=1000)
            client.record(f"c-{i}", "acme", "carol@acme.com", "chat", SONNET,
                          input_tokens=1000, output_tokens=1000)
    stop(sidecar)
    (line,) = _lines(tmp_path / "decisions.jsonl")
    salt_file = tmp_path / "data" / "decision-log.salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = load_salt(tmp_path / "data")
    assert len(salt) == 64
    assert line["user"] == hash_user(salt, "carol@acme.com")
    assert str(line["user"]).startswith("sha256:")
    assert "carol" not in json.dumps(line)
    assert (line["request_id"], line["decision"]) == ("c-2", "DENY")


def test_rotation_keeps_files_under_the_size_bound(make_sidecar: MakeSidecar,
                                                   tmp_path: Path) -> None:
    """A 2,000-byte log rotates to .1 and .2 (its config keeps 5); no file is larger."""
    sidecar, target = make_sidecar(decision_log_all=True, decision_log_max_bytes=2000)
    with SpendKeeperClient(target, timeout=5.0) as client:
        for i in range(40):
            client.authorize(f"r-{i}", "acme", "bob@acme.com", "chat", SONNET,
                             input_tokens=10, max_output_tokens=10)
    assert sidecar.decision_log.flush()
    assert sidecar.registry.get_sample_value("spendkeeper_decision_log_lines_total") == 40
    stop(sidecar)
    log = tmp_path / "decisions.jsonl"
    files = sorted(tmp_path.glob("decisions.jsonl*"))
    rotated = [p for p in files if p.suffix not in (".jsonl", ".lock")]
    assert [p.name for p in rotated] == [f"decisions.jsonl.{i}" for i in range(1, 6)]
    assert all(p.stat().st_size <= 2000 for p in (log, *rotated))
    kept = [line for p in reversed(rotated) for line in _lines(p)] + _lines(log)
    ids = [line["request_id"] for line in kept]
    assert ids == [f"r-{i}" for i in range(40 - len(ids), 40)]  # the newest, in order


def test_workers_sharing_one_log_rotate_without_losing_lines(tmp_path: Path) -> None:
    """Two logs on one file (as two worker processes would be) lose and split no line."""
    path = tmp_path / "shared.jsonl"
    logs = [DecisionLog(path, max_bytes=3000, backups=100, registry=CollectorRegistry())
            for _ in range(2)]
    for i in range(30):
        for n, log in enumerate(logs):
            log.authorized(*_deny(i * 2 + n), 0.0)
    for log in logs:
        log.close()
    files = [path, *sorted(tmp_path.glob("shared.jsonl.[0-9]*"))]
    assert len(files) > 5
    assert all(p.stat().st_size <= 3000 for p in files)
    ids = sorted(str(line["request_id"]) for p in files for line in _lines(p))
    assert ids == sorted(f"r-{i}" for i in range(60))


def test_a_full_queue_drops_and_counts_instead_of_blocking(policy_dir: Path,
                                                           tmp_path: Path) -> None:
    """A 2-entry queue whose writer is not running: RPCs still answer; drops are counted."""
    registry = CollectorRegistry()
    tiny = DecisionLog(tmp_path / "tiny.jsonl", log_all=True, queue_size=2, start=False,
                       registry=registry)
    config = load_config({"policy": str(policy_dir), "data_dir": str(tmp_path / "data"),
                          "listen": "127.0.0.1:0", "metrics_listen": "off", "watch": False},
                         env={})
    sidecar = Sidecar(config, extra_observers=(tiny,))
    sidecar.start()
    try:
        with SpendKeeperClient(f"127.0.0.1:{sidecar.port}", timeout=5.0) as client:
            answers = [client.authorize(f"q-{i}", "acme", "bob@acme.com", "chat", SONNET,
                                        max_output_tokens=10) for i in range(5)]
    finally:
        sidecar.stop(0.5)
    assert all(a.allowed for a in answers)
    assert registry.get_sample_value("spendkeeper_decision_log_dropped_total") == 3
    tiny.close()  # never started: close writes what was queued
    assert [line["request_id"] for line in _lines(tmp_path / "tiny.jsonl")] == ["q-0", "q-1"]
    assert registry.get_sample_value("spendkeeper_decision_log_lines_total") == 2
    tiny.authorized(*_deny(99), 0.0)  # after close: counted, not lost silently
    assert registry.get_sample_value("spendkeeper_decision_log_dropped_total") == 4
    tiny.close()  # idempotent

"""Shadow mode through the real server: never a DENY, yet every would-be deny counted and logged."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from _ops_support import SONNET, MakeSidecar, free_port, stop
from prometheus_client.parser import text_string_to_metric_families

from sidecar.client import SpendKeeperClient


def _decisions(port: int) -> dict[tuple[str, str, str, str], float]:
    """``spendkeeper_decisions_total`` scraped from the metrics endpoint, by labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "spendkeeper_decisions_total":
                labels = sample.labels
                found[(labels["org"], labels["decision"], labels["reason"],
                       labels["shadow"])] = sample.value
    return found


def _log(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shadow_org_is_never_denied_but_counted_and_logged(make_sidecar: MakeSidecar,
                                                           tmp_path: Path) -> None:
    """globex (shadow) over its $0.05 user limit: ALLOW every time, USER_LIMIT counted."""
    metrics_port = free_port()
    sidecar, target = make_sidecar(metrics_listen=f"127.0.0.1:{metrics_port}")
    answers = []
    with SpendKeeperClient(target, timeout=5.0) as client:
        for i in range(6):  # $0.018 each: the 3rd onwards would exceed $0.05
            auth = client.authorize(f"g-{i}", "globex", "hank@globex.com", "chat", SONNET,
                                    input_tokens=1000, max_output_tokens=1000)
            answers.append((auth.allowed, auth.raw.shadow if auth.raw else None,
                            auth.raw.shadow_reason if auth.raw else None))
            client.record(f"g-{i}", "globex", "hank@globex.com", "chat", SONNET,
                          input_tokens=1000, output_tokens=1000)
        # An enforcing org on the same server still denies.
        for i in range(3):
            client.authorize(f"c-{i}", "acme", "carol@acme.com", "chat", SONNET,
                             input_tokens=1000, max_output_tokens=1000)
            client.record(f"c-{i}", "acme", "carol@acme.com", "chat", SONNET,
                          input_tokens=1000, output_tokens=1000)
    assert all(allowed for allowed, _, _ in answers)
    assert all(shadow for _, shadow, _ in answers)
    assert [reason for _, _, reason in answers] == [1, 1, 4, 4, 4, 4]  # WITHIN, USER_LIMIT
    counts = _decisions(metrics_port)
    assert counts[("globex", "allow", "USER_LIMIT", "true")] == 4
    assert counts[("globex", "allow", "WITHIN_LIMITS", "true")] == 2
    assert not any(org == "globex" and decision == "deny" for org, decision, _, _ in counts)
    assert counts[("acme", "deny", "USER_LIMIT", "false")] == 1
    # The registry the server scrapes holds the same figure.
    assert sidecar.registry.get_sample_value(
        "spendkeeper_decisions_total",
        {"org": "globex", "decision": "allow", "reason": "USER_LIMIT", "shadow": "true"}) == 4
    stop(sidecar)
    lines = _log(tmp_path / "decisions.jsonl")
    shadowed = [ln for ln in lines if ln["org"] == "globex"]
    assert [ln["request_id"] for ln in shadowed] == ["g-2", "g-3", "g-4", "g-5"]
    assert all(ln["decision"] == "ALLOW" and ln["verdict"] == "USER_LIMIT" and ln["shadow"]
               for ln in shadowed)
    assert shadowed[0]["cost"] == "0.018"
    assert shadowed[0]["reserved"] == "0.018"
    denied = [ln for ln in lines if ln["org"] == "acme"]
    assert [(ln["request_id"], ln["decision"], ln["shadow"]) for ln in denied] == \
        [("c-2", "DENY", False)]


def test_global_shadow_allows_every_org_and_logs_would_be_denials(
        make_sidecar: MakeSidecar, tmp_path: Path) -> None:
    """With config shadow=true even the enforcing org is never denied."""
    sidecar, target = make_sidecar(shadow=True)
    with SpendKeeperClient(target, timeout=5.0) as client:
        answers = [client.authorize(f"c-{i}", "acme", "carol@acme.com", "chat", SONNET,
                                    input_tokens=1000, max_output_tokens=20_000)
                   for i in range(2)]
        unknown = client.authorize("u-1", "nope", "x", "chat", SONNET, max_output_tokens=1)
    assert all(a.allowed for a in answers)
    assert unknown.allowed
    stop(sidecar)
    lines = _log(tmp_path / "decisions.jsonl")
    assert [(ln["request_id"], ln["verdict"], ln["shadow"]) for ln in lines] == [
        ("c-0", "USER_LIMIT", True), ("c-1", "USER_LIMIT", True), ("u-1", "UNKNOWN_ORG", True)]
    assert sidecar.registry.get_sample_value(
        "spendkeeper_decisions_total",
        {"org": "acme", "decision": "allow", "reason": "USER_LIMIT", "shadow": "true"}) == 2

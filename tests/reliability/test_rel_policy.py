"""Broken policies: fuzzed DSL text, pathological files, and reloads that must be refused.

The loader's contract: any text either loads or raises PolicyError (with a
renderable message) — no other exception, no hang; parse time grows with
size, not worse (the worst ms/KB seen is reported; the only time limit is a
generous watchdog). A running server given a broken policy on SIGHUP keeps
answering with the last good one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _rel_support import (
    EXAMPLES,
    HERE,
    ROOT,
    Server,
    authorize_msg,
    free_port,
    report,
    scrape,
    serve_args,
    start_server,
    wait_until,
)
from _rel_support import (
    PARSE_WORST as WORST,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.compile import MAX_INCLUDE_DEPTH, load, load_text
from policy.errors import PolicyError
from policy.parse import MAX_FILE_BYTES
from sidecar.api.v1 import spendkeeper_pb2 as pb

#: Seconds any single load may take before the watchdog calls it a hang.
WATCHDOG = 60.0
SOURCES = {p.relative_to(EXAMPLES).as_posix(): p.read_bytes()
           for p in sorted(EXAMPLES.rglob("*.spend"))}


def watched_load(load_fn: Callable[[], object], size: int, label: str) -> PolicyError | None:
    """Run ``load_fn`` under a watchdog; only PolicyError may escape; note ms per KB."""
    outcome: list[BaseException | None] = []

    def body() -> None:
        try:
            load_fn()
            outcome.append(None)
        except BaseException as exc:  # judged below, in the test's thread
            outcome.append(exc)

    started = time.perf_counter()
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(WATCHDOG)
    assert not thread.is_alive(), f"{label}: the loader hung (> {WATCHDOG:.0f} s)"
    _note(label, time.perf_counter() - started, size)
    error = outcome[0]
    if error is None:
        return None
    if not isinstance(error, PolicyError):
        raise AssertionError(f"{label}: {type(error).__name__} escaped the loader") from error
    assert error.render().strip(), "a PolicyError that renders to nothing"
    return error


def _note(label: str, seconds: float, size: int) -> None:
    """Keep the worst ms per KB of ``label`` (inputs under 8 KB are all fixed overhead)."""
    if size >= 8192:
        WORST[label] = max(WORST.get(label, 0.0), seconds * 1000 / (size / 1024))


_CHILD = """
import sys, time
from policy.compile import load_text
from policy.errors import PolicyError
text = open(sys.argv[1], encoding="utf-8").read()
started = time.perf_counter()
try:
    load_text(text, "big.spend")
    outcome = "loaded"
except PolicyError as exc:
    assert exc.render().strip()
    outcome = "rejected"
print(outcome, time.perf_counter() - started)
"""


def isolated_load(tmp_path: Path, text: str, label: str, watchdog: float = 30.0) -> str:
    """load_text in a child process killed after ``watchdog`` s; "loaded" or "rejected".

    A child, so that a hang (or a quadratic blow-up) is stopped instead of
    burning a CPU for the rest of the run.
    """
    source = tmp_path / "input.spend"
    source.write_text(text, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(source)], capture_output=True,
                              text=True, env=env, timeout=watchdog, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{label}: loading {len(text):,} characters did not finish in "
                             f"{watchdog:.0f} s (hang or superlinear time)") from None
    assert proc.returncode == 0, f"{label}: an exception other than PolicyError:\n{proc.stderr}"
    outcome, seconds = str(proc.stdout).split()
    _note(label, float(seconds), len(text))
    return str(outcome)


# ------------------------------------------------------------------ hypothesis mutations
@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """An example file with 1 to 6 edits: deletions, duplications, random bytes, swaps."""
    name = draw(st.sampled_from(sorted(SOURCES)))
    data = bytearray(SOURCES[name])
    for _ in range(draw(st.integers(1, 6))):
        size = len(data)
        start = draw(st.integers(0, size))
        end = draw(st.integers(start, min(size, start + 400)))
        kind = draw(st.sampled_from(["delete", "duplicate", "bytes", "token", "swap-lines"]))
        if kind == "delete":
            del data[start:end]
        elif kind == "duplicate":
            data[start:start] = data[start:end] * draw(st.integers(1, 50))
        elif kind == "bytes":
            data[start:end] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "token":
            data[start:start] = draw(st.sampled_from(
                [b"{", b"}", b'"', b"\n", b";", b"$", b"%", b"x", b",", b"#", b"\\", b"\r",
                 b"include \"acme.spend\"\n", b"limit unlimited", b"$0.0000000000001",
                 b"2026-02-30", b"\xff", b"\x00", "\u2028".encode(), b"999999999999999999k"]))
        else:
            lines = bytes(data).split(b"\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\n".join(lines))
    return name, bytes(data)


def fuzz_examples(examples: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="spend-fuzz-"))
    try:
        counts = {"loaded": 0, "rejected": 0}

        @settings(max_examples=examples, suppress_health_check=[HealthCheck.too_slow])
        @given(case=mutated())
        def check(case: tuple[str, bytes]) -> None:
            name, data = case
            folder = workdir / "policy"
            shutil.rmtree(folder, ignore_errors=True)
            for rel, original in SOURCES.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data if rel == name else original)
            size = sum(len(v) for v in SOURCES.values()) - len(SOURCES[name]) + len(data)
            error = watched_load(lambda: load(folder), size, "mutated examples")
            counts["rejected" if error else "loaded"] += 1

        check()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(f"DSL fuzz (hypothesis): {examples} mutated example sets, {counts['rejected']} "
           f"rejected with PolicyError, {counts['loaded']} loaded, 0 other exceptions, worst "
           f"{WORST['mutated examples']:.1f} ms/KB")


@pytest.mark.slow
def test_mutated_examples_load_or_raise_policy_error() -> None:
    """100 sets of examples/*.spend with deletions, duplications and random bytes: PolicyError
    or a policy, never another exception, never a hang."""
    fuzz_examples(100)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_mutated_examples_soak() -> None:
    """The same over 4,000 mutated example sets."""
    fuzz_examples(4000)


# ------------------------------------------------------------------ atheris (libFuzzer)
def run_atheris(tmp_path: Path, seconds: int) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed in this environment")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for rel, data in SOURCES.items():
        (corpus / rel.replace("/", "_")).write_bytes(data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "_atheris_policy.py"), str(corpus),
         f"-max_total_time={seconds}", "-timeout=30", "-max_len=20000", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=seconds + 300,
        check=False)
    tail = "\n".join(proc.stderr.splitlines()[-40:])
    assert proc.returncode == 0, f"atheris found a crash or hang:\n{tail}"
    runs = re.findall(r"Done (\d+) runs", proc.stderr)
    report(f"DSL fuzz (atheris/libFuzzer): {runs[-1] if runs else '?'} runs in {seconds} s, "
           f"{len(list(corpus.iterdir()))} corpus entries, no crash, no hang (-timeout=30)")


@pytest.mark.slow
def test_atheris_finds_no_crash_in_the_loader(tmp_path: Path) -> None:
    """libFuzzer-guided inputs for 10 s: only PolicyError ever escapes load_text."""
    run_atheris(tmp_path, 10)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_atheris_soak(tmp_path: Path) -> None:
    """The same for 2.5 minutes (keeps make soak under 15 minutes)."""
    run_atheris(tmp_path, 150)


# ------------------------------------------------------------------ pathological files
DEEP = 10**5
PATHOLOGICAL = {
    "braces": "{" * DEEP,
    "nested-rates": 'rates "r" {\n' * DEEP,
    "nested-orgs": 'org "o" {' * DEEP + "}" * DEEP,
    "nested-models": 'rates "r" {\n' + 'model "m" {\n' * DEEP + "}\n" * (DEEP + 1),
    "long-line": 'plan "p" { user_type t { products ' + "chat, " * DEEP + "chat } }\n",
    "many-strings": 'rates "r" { model "m" ' + 'alias "a" ' * DEEP + "{ input $1 / MTok } }\n",
    "quotes": '"' * DEEP,
    "duplicate-members": 'org "o" {\n' + '  member "a" chat\n' * DEEP + "}\n",
    "comment-only": "#" * (DEEP * 10),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_input_is_rejected_cleanly(tmp_path: Path, name: str) -> None:
    """10^5-deep nesting, 10^5 items or errors on one line: PolicyError (or a policy) within
    a generous 30 s watchdog — no RecursionError, no hang, no quadratic blow-up."""
    isolated_load(tmp_path, PATHOLOGICAL[name], name)


def test_include_chain_deeper_than_the_limit_is_rejected(tmp_path: Path) -> None:
    """A chain of MAX_INCLUDE_DEPTH + 5 includes: include-depth, nothing else."""
    folder = tmp_path / "chain"
    folder.mkdir()
    depth = MAX_INCLUDE_DEPTH + 5
    for i in range(depth):
        (folder / f"f{i:03d}.spend").write_text(f'include "f{i + 1:03d}.spend"\n')
    (folder / f"f{depth:03d}.spend").write_text("# the end\n")
    error = watched_load(lambda: load(folder / "f000.spend"), depth * 20, "include chain")
    assert error is not None
    assert {d.code for d in error.diagnostics} == {"include-depth"}, error.render()


def test_ten_megabyte_file_is_rejected_cleanly(tmp_path: Path) -> None:
    """A 10 MB file (on disk and as text) is refused as file-too-large before parsing."""
    line = '  member "someone@example.com" chat limit $10 / month\n'
    text = 'org "o" {\n' + line * (10_000_000 // len(line)) + "}\n"
    assert len(text) > MAX_FILE_BYTES
    path = tmp_path / "policy" / "huge.spend"
    path.parent.mkdir()
    path.write_text(text)
    for label, fn in (("disk", lambda: load(path)), ("text", lambda: load_text(text))):
        error = watched_load(fn, len(text), "10 MB")
        assert error is not None, label
        assert [d.code for d in error.diagnostics] == ["file-too-large"], error.render()


def large_policy(members: int) -> str:
    """A valid policy with ``members`` members (about 55 bytes each)."""
    head = ('rates "flat" {\n  model "flat-10" { input $10 / MTok  output $10 / MTok }\n}\n'
            'plan "team" { user_type chat { seat $20 / month  products chat } }\n'
            'org "big" {\n  plan "team"  rates "flat"  timezone "UTC"\n'
            "  default user_type chat\n")
    body = "".join(f'  member "user{i}@example.com" chat limit ${i % 500 + 1} / month\n'
                   for i in range(members))
    return head + body + "}\n"


@pytest.mark.parametrize("members", [200, 2000])
def test_large_valid_policy_loads_in_linear_time(tmp_path: Path, members: int) -> None:
    """A valid org of 200 / 2,000 members loads; the ms per KB is reported (no time limit
    but the watchdog)."""
    text = large_policy(members)
    assert isolated_load(tmp_path, text, f"{members} members") == "loaded"
    report(f"large policy: {members} members, {len(text) / 1024:.0f} KB, "
           f"{WORST[f'{members} members']:.1f} ms/KB")


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_large_valid_policy_soak(tmp_path: Path) -> None:
    """40,000 members (about 2 MB) and a file just under the 8 MiB limit."""
    text = large_policy(40_000)
    assert isolated_load(tmp_path, text, "40000 members", 600) == "loaded"
    head, filler = large_policy(0), "# " + "x" * 97 + "\n"
    near = head + filler * ((MAX_FILE_BYTES - len(head) - 100) // 100)
    assert len(near) < MAX_FILE_BYTES
    assert isolated_load(tmp_path, near, "near limit", 600) == "loaded"
    report(f"large policy: 40,000 members {WORST['40000 members']:.1f} ms/KB; "
           f"{len(near) / 2**20:.1f} MiB of comments {WORST['near limit']:.2f} ms/KB")


# ------------------------------------------------------------------ reload
def _reloads(port: int, result: str) -> float:
    return scrape(port).get(("spendkeeper_policy_reloads_total",
                             frozenset({("result", result)})), 0.0)


BROKEN: dict[str, Callable[[Path], object]] = {
    "syntax-error": lambda d: (d / "reliability.spend").write_text(
        (d / "reliability.spend").read_text() + '\norg "late" {\n  plan\n'),
    "unknown-ref": lambda d: (d / "extra.spend").write_text(
        'org "x" {\n  plan "no-such-plan"  rates "flat"\n}\n'),
    "inexact-price": lambda d: (d / "extra.spend").write_text(
        'rates "r2" {\n  model "m2" { input $1.0000000000001 / MTok  output $5 / MTok }\n}\n'),
    "include-cycle": lambda d: ((d / "a.spend").write_text('include "b.spend"\n'),
                                (d / "b.spend").write_text('include "a.spend"\n')),
    "world-writable": lambda d: os.chmod(d / "reliability.spend", 0o666),
    "invalid-utf8": lambda d: (d / "extra.spend").write_bytes(b"# caf\xe9 \xff\xfe\n"),
    "oversized": lambda d: (d / "extra.spend").write_text(
        ("# " + "x" * 97 + "\n") * (MAX_FILE_BYTES // 100 + 10)),
}


def test_sighup_with_each_broken_policy_keeps_the_last_good_one(
        tmp_path: Path, policy_dir: Path, servers: list[Server]) -> None:
    """SIGHUP with a syntax error, an unknown reference, an inexact price, an include
    cycle, a world-writable file, invalid UTF-8 or an oversized file: each reload is
    rejected (counted) and the same policy_version keeps answering; a good edit then loads."""
    pristine = tmp_path / "pristine"
    shutil.copytree(policy_dir, pristine)
    metrics = free_port()
    server = start_server(tmp_path / "run", serve_args(policy_dir, tmp_path / "data",
                                                       metrics=f"127.0.0.1:{metrics}"))
    servers.append(server)
    stub = server.stub()

    def version(rid: str) -> str:
        resp = stub.Authorize(authorize_msg(rid, "open", "u", 100), timeout=30)
        assert resp.decision == pb.ALLOW
        return str(resp.policy_version)

    good = version("v0")
    for n, (kind, breakit) in enumerate(BROKEN.items()):
        errors = _reloads(metrics, "error")
        breakit(policy_dir)
        server.send(signal.SIGHUP)
        wait_until(lambda e=errors: _reloads(metrics, "error") > e,  # type: ignore[misc]
                   f"the {kind} reload to be rejected")
        assert server.alive()
        assert version(f"v{n + 1}") == good, f"{kind}: the policy in force changed"
        shutil.rmtree(policy_dir)
        shutil.copytree(pristine, policy_dir)
    assert "policy reload rejected" in server.stderr()
    assert _reloads(metrics, "ok") == 0
    # A good edit is swapped in: the same mechanism works, only bad policies are refused.
    (policy_dir / "reliability.spend").write_text(
        (policy_dir / "reliability.spend").read_text() + "\n# edited\n")
    server.send(signal.SIGHUP)
    wait_until(lambda: _reloads(metrics, "ok") == 1, "the good reload")
    assert version("v-last") != good
    assert server.stop() == 0
    report(f"reload: {len(BROKEN)} broken policies ({', '.join(BROKEN)}) rejected on SIGHUP, "
           f"version {good} kept answering; a good edit then loaded")

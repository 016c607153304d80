"""Fixtures of the reliability tests, and a summary of the figures they measured.

Every test here drives the real ``spendkeeper serve`` (a child process) on
127.0.0.1 with a temporary LMDB; see docs/reliability.md for what each test
proves. Long versions are marked ``soak`` and run with ``make soak``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _rel_support import FIGURES, PARSE_WORST, Server, copy_policy


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of tests/reliability/policy (tests edit and chmod it)."""
    return copy_policy(tmp_path / "policy")


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Register started servers here: any still running at teardown is killed."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.alive():
            server.kill()
        server.close_channels()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures the reliability tests measured (cycles, requests, lost, double)."""
    if FIGURES or PARSE_WORST:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
    if PARSE_WORST:
        kind, worst = max(PARSE_WORST.items(), key=lambda kv: kv[1])
        terminalreporter.write_line(
            f"policy parse time: worst {worst:.1f} ms/KB ({kind}); "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(PARSE_WORST.items())))

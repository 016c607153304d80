"""Constants and helpers shared by the operations tests (imported by name; conftest is not)."""

from __future__ import annotations

import json
import socket
import weakref
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sidecar import _cli_ops, cli
from sidecar.client import SpendKeeperClient
from sidecar.server import Sidecar

HERE = Path(__file__).resolve().parent
SONNET = "claude-sonnet-4-6"
#: 1,000 input tokens at $3 / MTok plus 1,000 output tokens at $15 / MTok.
COST_1K_1K = Decimal("0.018")

MakeSidecar = Callable[..., tuple[Sidecar, str]]
_STOPPED: weakref.WeakSet[Sidecar] = weakref.WeakSet()


def stop(sidecar: Sidecar) -> None:
    """Stop the server once; its stop() flushes and closes the decision log."""
    if sidecar in _STOPPED:
        return
    _STOPPED.add(sidecar)
    sidecar.stop(0.5)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spendkeeper(*args: str) -> int:
    """``spendkeeper ARGS`` in-process with the operations commands; the exit code.

    The parser is given the commands explicitly: under pytest, ``tests/`` is on
    sys.path and ``tests/sidecar`` (a namespace package) shadows the package
    directory that ``sidecar.cli`` scans for ``_cli_*`` modules.
    ``test_cli_discovers_the_operations_commands`` checks discovery itself.
    """
    parser = cli.build_parser([*cli.COMMANDS, *_cli_ops.COMMANDS])
    try:
        parsed = parser.parse_args(list(args))
        return int(parsed.run(parsed))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``spendkeeper ARGS`` in-process, which must succeed: (exit code, stdout)."""
    code = spendkeeper(*args)
    out, err = capsys.readouterr()
    assert code == 0, err
    return code, out


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """``spendkeeper ARGS --json`` in-process, parsed."""
    _, out = run(capsys, *args, "--json")
    return json.loads(out)


def call(client: SpendKeeperClient, rid: str, org: str, user: str, *, product: str = "chat",
         model: str = SONNET, inp: int = 1000, out: int = 1000, **usage: int) -> bool:
    """Authorize (max output ``out``) and, if allowed, record the same usage; True if allowed."""
    auth = client.authorize(rid, org, user, product, model, input_tokens=inp,
                            max_output_tokens=out)
    if auth.allowed:
        client.record(rid, org, user, product, model, input_tokens=inp, output_tokens=out,
                      **usage)
    return auth.allowed


def standard_traffic(client: SpendKeeperClient) -> dict[str, int]:
    """A month's worth of varied traffic; returns how many calls each user got allowed.

    alice (chat_code, $2): 5 claude_code calls. bob (chat, default $1): 3 chat
    calls with cache reads and one Record without an Authorize (web search).
    carol ($0.05): 3 calls of $0.018 -> the third is denied (USER_LIMIT).
    dave (unlisted: default chat, $1): code execution past the org's free hour.
    hank at globex (shadow, $0.05): 4 calls of $0.018 -> all allowed.
    """
    allowed: dict[str, int] = {}

    def go(rid: str, org: str, user: str, **kw: Any) -> None:
        allowed[user] = allowed.get(user, 0) + call(client, rid, org, user, **kw)

    for i in range(5):
        go(f"alice-{i}", "acme", "alice@acme.com", product="claude_code", inp=2000 + i)
    for i in range(3):
        client.authorize(f"bob-{i}", "acme", "bob@acme.com", "chat", SONNET,
                         input_tokens=500, cache_read_tokens=4000, max_output_tokens=700)
        client.record(f"bob-{i}", "acme", "bob@acme.com", "chat", SONNET, input_tokens=500,
                      cache_read_tokens=4000, output_tokens=650 + i)
    client.record("bob-search", "acme", "bob@acme.com", "chat", SONNET, input_tokens=300,
                  output_tokens=100, web_search_requests=3)
    for i in range(3):
        go(f"carol-{i}", "acme", "carol@acme.com")
    go("dave-0", "acme", "dave@acme.com", product="code_execution", code_execution_seconds=3000)
    go("dave-1", "acme", "dave@acme.com", product="code_execution", code_execution_seconds=1200)
    for i in range(4):
        go(f"hank-{i}", "globex", "hank@globex.com")
    return allowed

"""SPEC §6 hot reload: an edited policy is swapped in without a restart; a bad one is refused.

The versions a test expects are computed here with ``policy.compile.load`` on
the same files, so "the new policy is in force" is an exact comparison.
Files are replaced atomically (written beside, then renamed) so the watcher
never reads a half-written policy.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server_support import (
    PERIOD,
    POLICY,
    Server,
    authorize_request,
    copy_policy,
    serve_args,
    start_server,
    wait_until,
)

from policy.compile import load
from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

DEFAULT_LIMIT = "  default user limit $10 / month\n"
REJECTED = "policy reload rejected"


def replace_policy(policy_dir: Path, text: str) -> None:
    """Atomically replace limits.spend (the temporary file is outside the watched folder)."""
    staging = policy_dir.parent / "staging.spend"
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, policy_dir / "limits.spend")


def with_default_limit(amount: str) -> str:
    """The test policy with acme's default user limit ($10) set to ``amount``."""
    text = (POLICY / "limits.spend").read_text(encoding="utf-8")
    assert text.count(DEFAULT_LIMIT) == 1
    return text.replace(DEFAULT_LIMIT, f"  default user limit ${amount} / month\n")


def version(stub: pb_grpc.SpendKeeperStub) -> str:
    return stub.GetUsage(pb.GetUsageRequest(org="acme", period=PERIOD), timeout=10).policy_version


def fifteen_dollars(stub: pb_grpc.SpendKeeperStub, user: str) -> pb.AuthorizeResponse:
    """A $15 Authorize of a fresh unlisted acme user (the default user limit decides)."""
    return stub.Authorize(authorize_request("acme", user, "15"), timeout=10)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """A sidecar watching its policy directory, and that directory."""
    root = tmp_path_factory.mktemp("watched")
    policy = copy_policy(root / "policy")
    server = start_server(root / "run", serve_args(policy, root / "data"))
    yield server, policy
    assert server.stop() == 0, server.stderr()


def test_edited_policy_is_swapped_in_without_restart(watched: tuple[Server, Path]) -> None:
    """Raising acme's default user limit $10 -> $20 in the file: the watcher loads it, the
    new version answers and a $15 request that was USER_LIMIT is now allowed, same process."""
    server, policy = watched
    stub = server.stub()
    replace_policy(policy, with_default_limit("10"))  # as shipped, whatever ran before
    old = load(policy).version
    wait_until(lambda: version(stub) == old, "the $10 policy to be in force")
    denied = fifteen_dollars(stub, "reload-1@acme.com")
    assert (denied.decision, denied.reason, denied.policy_version) == (pb.DENY, pb.USER_LIMIT,
                                                                       old)
    replace_policy(policy, with_default_limit("20"))
    new = load(policy).version
    assert new != old
    wait_until(lambda: version(stub) == new, "the watcher to swap in the edited policy")
    allowed = fifteen_dollars(stub, "reload-2@acme.com")
    assert (allowed.decision, allowed.policy_version) == (pb.ALLOW, new)
    assert server.process.poll() is None
    assert REJECTED not in server.stderr()


BROKEN = {
    "syntax-error": ("  limit $50,000 / mnth\n", "syntax: unexpected 'mnth'"),
    "unknown-reference": ('  member "zoe" chatt\n', 'unknown-user-type: unknown user type "chatt"'),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_policy_is_rejected_logged_and_the_old_one_keeps_serving(
        watched: tuple[Server, Path], kind: str) -> None:
    """A policy that fails to check: the error (file:line:col) is logged on stderr, the
    version in force is unchanged and so is its limit."""
    server, policy = watched
    stub = server.stub()
    good = (policy / "limits.spend").read_text(encoding="utf-8")
    in_force = load(policy).version
    wait_until(lambda: version(stub) == in_force, "the current file to be in force")
    limit_before = fifteen_dollars(stub, f"broken-{kind}-1@acme.com").decision
    rejections = server.stderr().count(REJECTED)
    bad_line, error = BROKEN[kind]
    broken = good.replace('  member "alice"', bad_line + '  member "alice"', 1)
    try:
        replace_policy(policy, broken)
        wait_until(lambda: server.stderr().count(REJECTED) > rejections, "the rejection log")
        log = server.stderr()
        assert f"still serving version {in_force}" in log
        assert error in log
        assert "limits.spend:" in log.rsplit(REJECTED, 1)[1]
        assert version(stub) == in_force
        after = fifteen_dollars(stub, f"broken-{kind}-2@acme.com")
        assert (after.decision, after.policy_version) == (limit_before, in_force)
    finally:
        replace_policy(policy, good)
        wait_until(lambda: version(stub) == in_force, "the good policy to be back")


def test_sighup_reloads_the_policy_when_not_watching(tmp_path: Path) -> None:
    """--no-watch: SIGHUP loads the edited policy; its limit and version answer, same pid."""
    policy = copy_policy(tmp_path / "policy")
    server = start_server(tmp_path / "run", serve_args(policy, tmp_path / "data", "--no-watch"))
    try:
        stub = server.stub()
        assert fifteen_dollars(stub, "hup-1@acme.com").reason == pb.USER_LIMIT
        replace_policy(policy, with_default_limit("20"))
        new = load(policy).version
        server.send(signal.SIGHUP)
        wait_until(lambda: version(stub) == new, "SIGHUP to reload the policy")
        allowed = fifteen_dollars(stub, "hup-2@acme.com")
        assert (allowed.decision, allowed.policy_version) == (pb.ALLOW, new)
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0, server.stderr()

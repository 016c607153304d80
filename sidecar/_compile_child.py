"""Compile a policy in a child process and hand the result back pickled.

A reload parses and checks the whole policy set; for 10,000 members that is
about a second of pure-Python work which, inside the serving process, would
hold the GIL away from request threads (p99 rose ~300x in ``make bench``). The
child does that work on another core; the server only unpickles the result
(tens of milliseconds) and swaps it in.

Protocol: ``python -m sidecar._compile_child PATH`` writes one pickle to
stdout, ``("ok", Policy)`` or ``("error", tuple[Diagnostic, ...])``.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from policy.compile import load
from policy.errors import Diagnostic, Loc, PolicyError
from policy.model import Policy

__all__ = ["compile_in_child"]

_TIMEOUT = 120.0


def compile_in_child(path: Path) -> Policy:
    """Load ``path`` in a child process; raise :class:`PolicyError` like :func:`load`."""
    try:
        proc = subprocess.run([sys.executable, "-m", "sidecar._compile_child", str(path)],
                              capture_output=True, timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise PolicyError([Diagnostic("timeout", f"compiling the policy took over "
                                      f"{_TIMEOUT:.0f} s", Loc(str(path)))]) from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"policy compiler exited with {proc.returncode}: {detail[0]}")
    # The child is this program, run by us a moment ago: its pickle is trusted.
    kind, value = pickle.loads(proc.stdout)
    if kind == "error":
        raise PolicyError(value)
    assert isinstance(value, Policy)
    return value


def main() -> int:
    """Compile ``sys.argv[1]`` and write the pickled outcome to stdout."""
    try:
        outcome: tuple[str, object] = ("ok", load(Path(sys.argv[1])))
    except PolicyError as exc:
        outcome = ("error", exc.diagnostics)
    sys.stdout.buffer.write(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

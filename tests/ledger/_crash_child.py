"""Crash-test child: records requests forever, printing each id once record() returns.

Usage: ``python _crash_child.py DATA_DIR PREFIX``. The parent SIGKILLs it at a
random moment; every id printed was acknowledged (durable) and must survive.
Every fourth request is recorded without an Authorize, and every fourth is
only authorized (its reservation is left outstanding), to vary what a kill
interrupts.
"""

from __future__ import annotations

import sys

from _ledger_support import load_policy, make_req

from sidecar.ledger import Ledger, SystemClock


def main(data_dir: str, prefix: str) -> None:
    policy = load_policy()
    clock = SystemClock()
    ledger = Ledger(data_dir, map_size=256 << 20, clock=clock)
    for i in range(1_000_000):
        rid = f"{prefix}-{i}"
        req = make_req(rid, f"user{i % 3}", org="open", inp=100 + i, out=50, at=clock.now())
        if i % 4 != 0:
            ledger.authorize(policy, req)
        if i % 4 == 3:
            continue
        ledger.record(policy, req)
        print(rid, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""The gateway side of the crash tests: a load generator and the client-side ledger.

:class:`ClientBook` remembers every request the "gateway" sent, which answers
it got, and which requests are still in doubt (sent, but no answer: the server
may or may not have acted on them). After a crash, :meth:`ClientBook.settle`
sends every in-doubt request again with the *same* request id and payload,
as a real gateway must; :meth:`ClientBook.verify` then checks the server's
books against the client's, to the nano-USD.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from _rel_support import (
    NANOS_PER_TOKEN,
    PERIOD,
    authorize_msg,
    nanos,
    org_totals,
    read_ledger,
    record_msg,
)

from sidecar.api.v1 import spendkeeper_pb2 as pb
from sidecar.api.v1 import spendkeeper_pb2_grpc as pb_grpc

#: Statuses a call may end with while the server dies, stalls or drains.
TRANSPORT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})


@dataclass
class Op:
    """One request as the gateway sees it (estimate == actual usage: ``tokens`` output)."""

    rid: str
    org: str
    user: str
    tokens: int
    auth: pb.AuthorizeResponse | None = None  # the acknowledged answer
    cost: int | None = None  # acknowledged Record cost (nano-USD)
    epoch: int = 0  # which server life acknowledged the Record
    acked_at: float = 0.0  # time.monotonic() when the Record was acknowledged

    @property
    def settled(self) -> bool:
        """Nothing more to send: denied, or allowed and recorded."""
        return self.auth is not None and (self.auth.decision != pb.ALLOW
                                          or self.cost is not None)


@dataclass
class ClientBook:
    """Every request sent, acknowledged or in doubt; thread-safe."""

    org: str = "open"
    users: int = 5
    seed: int = 0
    ops: dict[str, Op] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    #: Request id -> the call that failed ("Authorize" or "Record") and its status.
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: In-doubt Records that turned out to be committed already (answered duplicate).
    in_doubt_committed: int = 0
    in_doubt_resent: int = 0
    epoch: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new_op(self, rng: random.Random) -> Op:
        """A fresh request of 1 to 5,000 tokens for one of the users."""
        op = Op(f"{self.seed:x}-{len(self.ops)}-{rng.getrandbits(40):x}", self.org,
                f"user-{rng.randrange(self.users)}", rng.randint(1, 5000))
        with self._lock:
            self.ops[op.rid] = op
        return op

    # -------------------------------------------------------------- sending
    def _authorize(self, stub: pb_grpc.SpendKeeperStub, op: Op, timeout: float) -> None:
        resp = stub.Authorize(authorize_msg(op.rid, op.org, op.user, op.tokens), timeout=timeout)
        if op.auth is None:
            op.auth = resp
        else:  # a retry of an acknowledged Authorize must replay the stored answer exactly
            assert resp == op.auth, f"{op.rid}: Authorize answered differently on retry"

    def _record(self, stub: pb_grpc.SpendKeeperStub, op: Op, timeout: float) -> bool:
        resp = stub.Record(record_msg(op.rid, op.org, op.user, op.tokens), timeout=timeout)
        cost = nanos(resp.cost)
        assert cost == op.tokens * NANOS_PER_TOKEN, (op.rid, cost)
        op.cost = cost
        op.epoch = self.epoch
        op.acked_at = time.monotonic()
        return bool(resp.duplicate)

    def send_one(self, stub: pb_grpc.SpendKeeperStub, rng: random.Random,
                 timeout: float = 10.0) -> Op:
        """One new request: Authorize, then Record when allowed (errors propagate)."""
        op = self.new_op(rng)
        self._authorize(stub, op, timeout)
        if op.auth is not None and op.auth.decision == pb.ALLOW:
            assert not self._record(stub, op, timeout)
        return op

    def run(self, stub: pb_grpc.SpendKeeperStub, stop: threading.Event, seed: int,
            timeout: float = 10.0, persist: bool = False) -> None:
        """Authorize then Record new requests until ``stop``.

        A transport error leaves the request in doubt and ends the loop (or,
        with ``persist``, moves on to a new request: the server comes back).
        """
        rng = random.Random(seed)
        while not stop.is_set():
            op = self.new_op(rng)
            call = "Authorize"
            try:
                self._authorize(stub, op, timeout)
                if op.auth is not None and op.auth.decision == pb.ALLOW:
                    call = "Record"
                    dup = self._record(stub, op, timeout)
                    assert not dup, f"{op.rid}: a first Record answered duplicate"
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details()
                with self._lock:
                    self.errors[code] += 1
                    self.failed[op.rid] = (call, code)
            else:
                continue
            assert code in TRANSPORT, f"{op.rid}: {code}: {details}"
            if not persist:
                return
            time.sleep(0.02)

    # -------------------------------------------------------------- after a restart
    def check_acknowledged(self, stub: pb_grpc.SpendKeeperStub, epoch: int | None = None) -> int:
        """Resend acknowledged Records (of ``epoch``, or all): each must be a duplicate.

        A Record the server acknowledged and then lost would be charged afresh
        here (duplicate=false): that is the failure this check catches.
        Acknowledged Authorizes must replay their stored answer byte for byte.
        """
        checked = 0
        for op in list(self.ops.values()):
            if op.cost is None or (epoch is not None and op.epoch != epoch):
                continue
            first = op.cost
            resp = stub.Record(record_msg(op.rid, op.org, op.user, op.tokens), timeout=30)
            assert resp.duplicate, f"acknowledged Record {op.rid} was lost"
            assert nanos(resp.cost) == first, f"{op.rid}: cost changed on replay"
            self._authorize(stub, op, 30)
            checked += 1
        return checked

    def settle(self, stub: pb_grpc.SpendKeeperStub) -> int:
        """Send every in-doubt request again with the same id; returns how many."""
        resent = 0
        for op in list(self.ops.values()):
            if op.settled:
                continue
            resent += 1
            if op.auth is None:
                self._authorize(stub, op, 30)
            assert op.auth is not None
            if op.auth.decision == pb.ALLOW and self._record(stub, op, 30):
                self.in_doubt_committed += 1
        self.in_doubt_resent += resent
        return resent

    # -------------------------------------------------------------- the books
    @property
    def recorded(self) -> dict[str, int]:
        """Request id -> acknowledged cost."""
        return {op.rid: op.cost for op in list(self.ops.values()) if op.cost is not None}

    def verify(self, stub: pb_grpc.SpendKeeperStub) -> tuple[int, int]:
        """Σ server spend == Σ client costs, one request per recorded id, nothing reserved."""
        assert all(op.settled for op in self.ops.values())
        recorded = self.recorded
        spent, reserved, requests = org_totals(stub, self.org)
        assert (spent, reserved, requests) == (sum(recorded.values()), 0, len(recorded)), (
            f"server (spent, reserved, requests) = {(spent, reserved, requests)}; client: "
            f"{(sum(recorded.values()), 0, len(recorded))}")
        return spent, len(recorded)

    def verify_files(self, data_dir: object) -> tuple[int, int]:
        """With the server stopped: the journal holds each recorded id exactly once.

        Returns (lost, double): acknowledged ids missing from the journal and ids
        journaled more than once.
        """
        from pathlib import Path

        books = read_ledger(Path(str(data_dir)))
        recorded = self.recorded
        double = sum(1 for n in books.journal_ids.values() if n > 1)
        lost = sum(1 for rid in recorded if books.journal_ids[rid] != 1)
        extra = set(books.journal_ids) - set(recorded)
        assert (lost, double, extra) == (0, 0, set()), (lost, double, sorted(extra)[:5])
        assert books.journal_nanos == sum(recorded.values())
        org = books.counters[(PERIOD, "org", self.org)]
        assert org == (sum(recorded.values()), 0, len(recorded)), org
        return lost, double

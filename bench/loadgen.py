"""The load generator: spawned client processes driving a gRPC target.

Each client process (``multiprocessing`` with the ``spawn`` start method, so no
gRPC state is ever forked) opens its own channels, each its own TCP
connection (``grpc.use_local_subchannel_pool``), and sends pre-serialized
requests as raw bytes (no protobuf work on the client; a unique request id is
prepended to a serialized template per call). Calls are issued with
``future()`` and completion callbacks, so one process keeps many calls in
flight without a thread per call.

- closed loop: ``concurrency`` calls in flight; each completion sends the next.
- open loop: calls are sent at scheduled times (``rate`` per second); latency
  is measured from the *scheduled* send time, so a client or server that falls
  behind is charged for it (coordinated omission accounted for). The time from
  the actual send is kept too ("service time").

Processes start together at a shared CLOCK_MONOTONIC instant and report their
latencies, completed calls, errors and their own CPU time over the window.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import resource
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["ALL_CPUS", "Job", "LoadGen", "LoadResult", "set_affinity"]

_NS = 1_000_000_000
ALL_CPUS = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()


@dataclass(frozen=True)
class Job:
    """What one client process does during one measurement."""

    target: str
    method: str  # e.g. "/spendkeeper.v1.SpendKeeper/Authorize"
    templates: tuple[bytes, ...]  # serialized requests without field 1 (request_id)
    tag: str  # makes request ids unique across runs and processes
    duration: float
    mode: str = "closed"  # "closed" or "open"
    concurrency: int = 1  # closed loop: calls in flight
    rate: float = 0.0  # open loop: calls per second from this process
    phase: float = 0.0  # open loop: offset of the first call, in intervals
    channels: int = 1
    cpus: tuple[int, ...] | None = None  # pin this process to these (None: every CPU)
    warmup: int = 20  # blocking calls per channel before the window


@dataclass
class LoadResult:
    """Merged figures of every client process for one measurement."""

    duration: float
    completed: int
    errors: int
    latencies_ns: list[int]  # sorted; closed loop: per call; open loop: from scheduled time
    service_ns: list[int] = field(default_factory=list)  # open loop: from the actual send
    timeline: list[tuple[int, int]] = field(default_factory=list)  # open: (scheduled, latency)
    client_cpu: list[float] = field(default_factory=list)  # per process, fraction of a core
    error_sample: str = ""
    start_ns: int = 0  # CLOCK_MONOTONIC start of the window

    @property
    def within_window_per_s(self) -> float:
        """Open loop: calls per second that completed inside the window (the achieved rate)."""
        if not self.timeline:
            return self.per_s
        end = self.start_ns + int(self.duration * _NS)
        return sum(1 for s, lat in self.timeline if s + lat <= end) / self.duration

    @property
    def per_s(self) -> float:
        """Completed calls per second over the window."""
        return self.completed / self.duration if self.duration else 0.0


def set_affinity(cpus: Sequence[int] | None, pid: int | None = None) -> None:
    """Pin every thread of process ``pid`` (default: this one) to ``cpus``."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    pid = os.getpid() if pid is None else pid
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, set(cpus))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _payloads(job: Job, index: int) -> Callable[[int], bytes]:
    templates = job.templates
    count = len(templates)
    prefix = f"{job.tag}-{index}-".encode()

    def make(seq: int) -> bytes:
        rid = prefix + str(seq).encode()
        return b"\n" + bytes((len(rid),)) + rid + templates[seq % count]

    return make


def _client(conn: Connection, index: int) -> None:
    """The client process: run jobs sent over ``conn`` until told to stop (None)."""
    import grpc

    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(_run_job(grpc, job, index, conn))
        except Exception as exc:  # report, and stay usable for the next job
            conn.send({"failed": repr(exc)})


def _run_job(grpc: Any, job: Job, index: int, conn: Connection) -> dict[str, Any]:
    set_affinity(job.cpus or ALL_CPUS)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    channels = [grpc.insecure_channel(job.target, options=options) for _ in range(job.channels)]
    try:
        calls = [ch.unary_unary(job.method) for ch in channels]  # raw bytes both ways
        make = _payloads(job, index)
        seq = itertools.count()
        for call in calls:
            for _ in range(job.warmup):
                call(make(next(seq)), timeout=30)
        conn.send("ready")
        start_ns = conn.recv()
        if job.mode == "open":
            return _open_loop(grpc, calls, job, make, seq, start_ns)
        return _closed_loop(grpc, calls, job, make, seq, start_ns)
    finally:
        for ch in channels:
            ch.close()


def _sleep_until(when_ns: int) -> None:
    delay = when_ns - time.monotonic_ns()
    if delay > 0:
        time.sleep(delay / _NS)


def _closed_loop(grpc: Any, calls: list[Any], job: Job, make: Callable[[int], bytes],
                 seq: itertools.count[int], start_ns: int) -> dict[str, Any]:
    end_ns = start_ns + int(job.duration * _NS)
    latencies = array("q")
    errors: list[str] = []
    state = {"active": job.concurrency}
    lock = threading.Lock()
    done = threading.Event()
    clock = time.monotonic_ns

    def fire(slot: int) -> None:
        started = clock()
        future = calls[slot % len(calls)].future(make(next(seq)), timeout=30)
        future.add_done_callback(lambda f: finished(f, started, slot))

    def finished(future: Any, started: int, slot: int) -> None:
        now = clock()
        if future.exception() is None:
            if now <= end_ns:
                latencies.append(now - started)
        elif len(errors) < 5 or now <= end_ns:
            errors.append(f"{future.code()}: {future.details()}")
        if now < end_ns:
            fire(slot)
            return
        with lock:
            state["active"] -= 1
            if state["active"] == 0:
                done.set()

    _sleep_until(start_ns)
    cpu0 = _cpu_seconds()
    for slot in range(job.concurrency):
        fire(slot)
    _sleep_until(end_ns)
    cpu1 = _cpu_seconds()
    done.wait(60)
    return {"latencies": latencies.tobytes(), "completed": len(latencies),
            "errors": len(errors), "error_sample": errors[0] if errors else "",
            "cpu": (cpu1 - cpu0) / job.duration}


def _open_loop(grpc: Any, calls: list[Any], job: Job, make: Callable[[int], bytes],
               seq: itertools.count[int], start_ns: int) -> dict[str, Any]:
    interval = _NS / job.rate
    total = max(1, int(job.rate * job.duration))
    first = start_ns + int(job.phase * interval)
    end_ns = start_ns + int(job.duration * _NS)
    from_schedule = array("q")
    from_send = array("q")
    sent_at = array("q")
    errors: list[str] = []
    state = {"pending": total}
    lock = threading.Lock()
    done = threading.Event()
    clock = time.monotonic_ns
    ncalls = len(calls)

    def finished(future: Any, scheduled: int, sent: int) -> None:
        now = clock()
        if future.exception() is None:
            from_schedule.append(now - scheduled)
            from_send.append(now - sent)
            sent_at.append(scheduled)
        else:
            errors.append(f"{future.code()}: {future.details()}")
        with lock:
            state["pending"] -= 1
            if state["pending"] == 0:
                done.set()

    _sleep_until(start_ns)
    cpu0 = _cpu_seconds()
    for i in range(total):
        scheduled = first + int(i * interval)
        # time.sleep releases the GIL (a spin would starve the completion callbacks);
        # its overshoot is charged to the latency, as a late send should be.
        _sleep_until(scheduled)
        sent = clock()
        future = calls[i % ncalls].future(make(next(seq)), timeout=30)
        future.add_done_callback(
            lambda f, scheduled=scheduled, sent=sent: finished(f, scheduled, sent))
    _sleep_until(end_ns)
    cpu1 = _cpu_seconds()
    done.wait(60)
    return {"latencies": from_schedule.tobytes(), "service": from_send.tobytes(),
            "scheduled": sent_at.tobytes(),
            "completed": len(from_schedule), "errors": len(errors),
            "error_sample": errors[0] if errors else "", "cpu": (cpu1 - cpu0) / job.duration}


class LoadGen:
    """A fixed set of spawned client processes, reused for every measurement."""

    def __init__(self, processes: int = 2) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client, args=(child, index), daemon=True,
                               name=f"bench-client-{index}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def size(self) -> int:
        """How many client processes there are."""
        return len(self._procs)

    @property
    def pids(self) -> list[int]:
        """The client processes' ids."""
        return [p.pid for p in self._procs]

    def run(self, jobs: Sequence[Job | None],
            during: Callable[[int, int], None] | None = None) -> LoadResult:
        """Run one job per process (None: that process sits out) over the same window.

        ``during(start_ns, end_ns)`` runs in this process while the clients load
        the target (to sample server CPU, send signals...).
        """
        active = [(conn, job) for conn, job in zip(self._conns, jobs, strict=False)
                  if job is not None]
        for conn, job in active:
            conn.send(job)
        for conn, _ in active:
            answer = conn.recv()
            if answer != "ready":
                raise RuntimeError(f"client failed to start: {answer}")
        duration = max(job.duration for _, job in active)
        start_ns = time.monotonic_ns() + 20_000_000
        for conn, _ in active:
            conn.send(start_ns)
        if during is not None:
            during(start_ns, start_ns + int(duration * _NS))
        results = [conn.recv() for conn, _ in active]
        failed = [r["failed"] for r in results if "failed" in r]
        if failed:
            raise RuntimeError(f"client failed: {failed[0]}")
        latencies: list[int] = []
        service: list[int] = []
        timeline: list[tuple[int, int]] = []
        for r in results:
            mine = array("q", r["latencies"])
            latencies.extend(mine)
            if "service" in r:
                service.extend(array("q", r["service"]))
                timeline.extend(zip(array("q", r["scheduled"]), mine, strict=True))
        latencies.sort()
        service.sort()
        sample = next((r["error_sample"] for r in results if r["error_sample"]), "")
        return LoadResult(duration=duration, completed=sum(r["completed"] for r in results),
                          errors=sum(r["errors"] for r in results), latencies_ns=latencies,
                          service_ns=service, timeline=timeline,
                          client_cpu=[r["cpu"] for r in results],
                          error_sample=sample, start_ns=start_ns)

    def close(self) -> None:
        """Stop the client processes."""
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> LoadGen:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

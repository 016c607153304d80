"""The benchmark suite behind ``python -m bench``: every SPEC §7 figure, measured several times.

Sections (``--only NAME[,NAME]``):

- ``ledger``: in-process Authorize latency and durable Record throughput
  (:mod:`bench.ledger_bench`).
- ``metrics``: the observer's cost per call (``Metrics.authorized`` and
  ``recorded`` minus an empty function with the same arguments).
- ``policy``: loading a generated policy of 10,000 members x 100 models.
- ``grpc``: closed-loop Authorize / Record / bare echo over loopback at 1, 8
  and 32 calls in flight; the server model sweep (sync threads 4/8/16 and
  grpc.aio) that picks the sync thread count the other gRPC sections use; the
  servicer's own in-process cost per call.
- ``openloop``: latency at a fixed offered load (1k and 3k calls/s).
- ``workers``: ``--workers 1`` against ``--workers 2`` throughput.
- ``reload``: p99 inside SIGHUP reloads of the big policy against steady state.

Where processes are pinned: every single-process server of ``grpc``,
``openloop`` and ``reload`` runs on CPU 0 and the load generator on CPU 1, so
a server's figures are "per server core" and the client never steals its CPU;
``workers`` pins nothing (two server processes need both cores, so the client
competes with them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import os
import re
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import ledger_bench
from bench.loadgen import ALL_CPUS, Job, LoadGen, LoadResult
from bench.policies import big_request, write_big, write_small
from bench.servers import (
    ServerProc,
    launch_aio,
    launch_echo,
    launch_sidecar,
    ready,
    system_cpu,
)
from bench.stats import Figure, Spread, percentile, spread

__all__ = ["SECTIONS", "Context", "run_sections"]

SECTIONS = ("ledger", "metrics", "policy", "grpc", "openloop", "workers", "reload")
AUTHORIZE = "/spendkeeper.v1.SpendKeeper/Authorize"
RECORD = "/spendkeeper.v1.SpendKeeper/Record"
ECHO = "/bench.Echo/Authorize"
CONCURRENCY = (1, 8, 32)
SWEEP_THREADS = (4, 8, 16)
SATURATED = 0.9  # a client process using this much of a core is the bottleneck
_TWO_CPUS = len(ALL_CPUS) >= 2
SERVER_CPUS: tuple[int, ...] | None = (ALL_CPUS[0],) if _TWO_CPUS else None
CLIENT_CPUS: tuple[int, ...] | None = (ALL_CPUS[1],) if _TWO_CPUS else None
_NS = 1_000_000_000
_TAGS = itertools.count()


@dataclass(frozen=True)
class Sizes:
    """How much each section does (full run and ``--quick``)."""

    reps: int
    duration: float  # closed-loop window, seconds
    open_duration: float
    rates: tuple[int, ...]
    metrics_calls: int
    servicer_calls: int
    policy_members: int
    policy_loads: int
    reload_duration: float
    reload_rate: int
    reload_settle: float
    reload_baseline: float  # seconds of steady state before the first reload
    warmup: int  # blocking calls per channel before each window
    record_runs: int


FULL = Sizes(reps=3, duration=1.5, open_duration=3.0, rates=(1000, 3000), metrics_calls=200_000,
             servicer_calls=3000, policy_members=10_000, policy_loads=3, reload_duration=18.0,
             reload_rate=1000, reload_settle=1.0, reload_baseline=4.0, warmup=20,
             record_runs=3)
QUICK = Sizes(reps=2, duration=0.2, open_duration=0.3, rates=(1000, 3000), metrics_calls=20_000,
              servicer_calls=300, policy_members=1_000, policy_loads=2, reload_duration=2.4,
              reload_rate=500, reload_settle=0.3, reload_baseline=0.6, warmup=3,
              record_runs=2)


@dataclass
class Context:
    """State shared by the sections: sizes, temp dir, servers, load generator, results."""

    quick: bool
    root: Path
    figures: list[Figure] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, ServerProc] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # section -> what went wrong
    threads: int = 8  # the sync server's thread count the gRPC sections use
    _loadgen: LoadGen | None = None
    _policies: dict[str, Path] = field(default_factory=dict)

    @property
    def sizes(self) -> Sizes:
        """The sizes in force."""
        return QUICK if self.quick else FULL

    @property
    def loadgen(self) -> LoadGen:
        """The client processes (started on first use)."""
        if self._loadgen is None:
            self._loadgen = LoadGen(max(2, len(ALL_CPUS)))
        return self._loadgen

    def policy(self, name: str) -> Path:
        """The small ("small") or big ("big") policy directory, written on first use."""
        if name not in self._policies:
            target = self.root / f"policy-{name}"
            self._policies[name] = (write_small(target) if name == "small" else
                                    write_big(target, members=self.sizes.policy_members))
        return self._policies[name]

    def add(self, key: str, label: str, unit: str, values: Sequence[float] | Spread, *,
            target: str = "", check: Callable[[float], bool] | None = None, note: str = "",
            extra: dict[str, Any] | None = None) -> Figure:
        """Record a figure (runs, or their spread); ``check(median)`` says if a target is met."""
        value = values if isinstance(values, Spread) else spread(values)
        fig = Figure(key, label, unit, value, target, None if check is None else
                     bool(check(value.median)), note, extra or {})
        self.figures.append(fig)
        return fig

    def close(self) -> None:
        """Stop the servers and the load generator."""
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        if self._loadgen is not None:
            self._loadgen.close()


def say(text: str) -> None:
    """Progress output."""
    print(text, flush=True)


# ---------------------------------------------------------------------- requests
def _usage_kwargs() -> dict[str, int]:
    return {"input_tokens": 2_000, "output_tokens": 1_024, "cache_read_tokens": 10_000}


def authorize_templates(big: bool = False) -> tuple[bytes, ...]:
    """Serialized AuthorizeRequests without request_id (the load generator adds it)."""
    from sidecar.api.v1 import spendkeeper_pb2 as pb

    out = []
    for i in range(100):
        org, user, model = big_request(i * 97) if big else ("bench", f"user{i}", "m1")
        out.append(pb.AuthorizeRequest(org=org, user=user, product="chat", model=model,
                                       estimate=pb.Usage(**_usage_kwargs()))
                   .SerializeToString())
    return tuple(out)


def record_templates() -> tuple[bytes, ...]:
    """Serialized RecordRequests without request_id (fresh ids: unauthorized usage)."""
    from sidecar.api.v1 import spendkeeper_pb2 as pb

    usage = {**_usage_kwargs(), "output_tokens": 500}
    return tuple(pb.RecordRequest(org="bench", user=f"user{i}", product="chat", model="m1",
                                  usage=pb.Usage(**usage)).SerializeToString()
                 for i in range(100))


def _tag() -> str:
    return f"b{os.getpid()}t{time.monotonic_ns() % 10**9}n{next(_TAGS)}"


def closed_jobs(ctx: Context, server: ServerProc, method: str, templates: tuple[bytes, ...],
                concurrency: int, cpus: tuple[int, ...] | None,
                channels: int = 8) -> list[Job | None]:
    """Split ``concurrency`` calls in flight over the client processes (see ``_clients``)."""
    n = _clients(ctx, cpus)
    share = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
    tag = _tag()
    return [Job(server.target, method, templates, tag, ctx.sizes.duration, mode="closed",
                concurrency=c, channels=min(c, channels), cpus=cpus, warmup=ctx.sizes.warmup)
            if c else None for c in share + [0] * (ctx.loadgen.size - n)]


def open_jobs(ctx: Context, server: ServerProc, method: str, templates: tuple[bytes, ...],
              rate: float, duration: float, cpus: tuple[int, ...] | None) -> list[Job | None]:
    """Spread ``rate`` calls/s over the client processes, their schedules interleaved."""
    n = _clients(ctx, cpus)
    tag = _tag()
    return [Job(server.target, method, templates, tag, duration, mode="open", rate=rate / n,
                phase=i / n, channels=4, cpus=cpus, warmup=ctx.sizes.warmup) if i < n else None
            for i in range(ctx.loadgen.size)]


def _clients(ctx: Context, cpus: tuple[int, ...] | None) -> int:
    """How many client processes to use: one per CPU they may run on. Two processes
    pinned to one core only take turns, and every turn shows up as latency."""
    return min(ctx.loadgen.size, len(cpus) if cpus else ctx.loadgen.size)


@dataclass
class Sample:
    """One measurement: the clients' figures and the server's CPU use over the window."""

    result: LoadResult
    server_cpu: list[float]  # per serving process, fraction of a core
    machine_busy: float = 0.0  # cores busy on the whole machine over the window

    @property
    def capacity(self) -> float:
        """Calls per second of server CPU (what one fully used core would answer)."""
        used = sum(self.server_cpu) * self.result.duration
        return self.result.completed / used if used > 0 else 0.0

    @property
    def others(self) -> float:
        """Cores used by processes other than the server and the load generator."""
        return max(0.0, self.machine_busy - sum(self.server_cpu) - sum(self.result.client_cpu))

    @property
    def client_max(self) -> float:
        """The busiest client process's CPU use (fraction of a core)."""
        return max(self.result.client_cpu, default=0.0)

    def summary(self) -> dict[str, Any]:
        """Per-run details for the JSON."""
        r = self.result
        return {"per_s": r.per_s, "completed": r.completed, "errors": r.errors,
                "p50_ms": percentile(r.latencies_ns, 50) / 1e6,
                "p99_ms": percentile(r.latencies_ns, 99) / 1e6,
                "client_cpu": [round(c, 3) for c in r.client_cpu],
                "server_cpu": [round(c, 3) for c in self.server_cpu],
                "other_processes_cpu": round(self.others, 3),
                **({"error_sample": r.error_sample} if r.error_sample else {})}


def measure(ctx: Context, server: ServerProc, jobs: Sequence[Job | None],
            during: Callable[[int, int], None] | None = None) -> Sample:
    """Run ``jobs`` against ``server`` and sample the server's CPU over the same window."""
    cpu: dict[str, list[float]] = {}
    machine: dict[str, tuple[float, float]] = {}

    def sample(start_ns: int, end_ns: int) -> None:
        _sleep_until(start_ns)
        cpu["start"] = server.cpu()
        machine["start"] = system_cpu()
        if during is not None:
            during(start_ns, end_ns)
        _sleep_until(end_ns)
        cpu["end"] = server.cpu()
        machine["end"] = system_cpu()

    result = ctx.loadgen.run(jobs, sample)
    seconds = result.duration
    start, end = cpu.get("start", []), cpu.get("end", [])
    server_cpu = [(b - a) / seconds for a, b in zip(start, end, strict=False)]
    if result.errors and not result.completed:
        raise RuntimeError(f"every call to {server.name} failed: {result.error_sample}")
    busy = (machine["end"][0] - machine["start"][0]) / seconds if machine else 0.0
    return Sample(result, server_cpu, busy)


def _sleep_until(when_ns: int) -> None:
    delay = when_ns - time.monotonic_ns()
    if delay > 0:
        time.sleep(delay / _NS)


def _saturation_note(samples: Sequence[Sample], pinned: bool = True) -> str:
    """Whether the load generator was the bottleneck: a client process at >= 90 % of a core,
    or (pinned) the client processes together at >= 90 % of the cores they are pinned to."""
    worst = max((s.client_max for s in samples), default=0.0)
    total = max((sum(s.result.client_cpu) for s in samples), default=0.0)
    cores = len(CLIENT_CPUS) if pinned and CLIENT_CPUS else len(ALL_CPUS)
    if worst >= SATURATED or (pinned and total >= SATURATED * cores):
        return f"client saturated ({total:.2f} of {cores} core{'s' * (cores > 1)})"
    return f"client {total:.2f} of {cores} core{'s' * (cores > 1)}"


# ---------------------------------------------------------------------- servers
def start_servers(ctx: Context, wanted: Sequence[str]) -> dict[str, ServerProc]:
    """Launch the servers the sections ``wanted`` need and do not have yet (no waiting)."""
    small = ctx.policy("small")
    launching: dict[str, ServerProc] = {}

    def launch(name: str, make: Callable[[], ServerProc]) -> None:
        if name not in ctx.servers and name not in launching:
            launching[name] = make()

    if "grpc" in wanted:
        for threads in SWEEP_THREADS:
            launch(f"sync{threads}", lambda t=threads: launch_sidecar(  # type: ignore[misc]
                ctx.root / f"sync{t}", small, threads=t, cpus=SERVER_CPUS, name=f"sync{t}"))
        launch("aio", lambda: launch_aio(ctx.root / "aio", small, cpus=SERVER_CPUS))
        size = response_size(ctx)
        launch("echo", lambda: launch_echo(ctx.root / "echo", size, cpus=SERVER_CPUS))
    if "openloop" in wanted:
        launch(f"sync{ctx.threads}", lambda: launch_sidecar(
            ctx.root / "open", small, threads=ctx.threads, cpus=SERVER_CPUS,
            name=f"sync{ctx.threads}"))
    if "workers" in wanted:
        for workers in (1, 2):
            launch(f"workers{workers}", lambda w=workers: launch_sidecar(  # type: ignore[misc]
                ctx.root / f"workers{w}", small, threads=ctx.threads, workers=w,
                name=f"workers{w}"))
    if "reload" in wanted:
        big = ctx.policy("big")
        launch("big", lambda: launch_sidecar(ctx.root / "big", big, threads=ctx.threads,
                                             cpus=SERVER_CPUS, name="big"))
    if launching:
        say(f"== starting servers: {', '.join(launching)}")
    ctx.servers.update(launching)
    return launching


def await_servers(ctx: Context, launching: dict[str, ServerProc]) -> None:
    """Wait until every server in ``launching`` listens, then check each answers ALLOW."""
    for server in launching.values():
        ready(server)
    _check_allowed(ctx, launching)


def _check_allowed(ctx: Context, servers: dict[str, ServerProc]) -> None:
    """One real Authorize per sidecar: the hot path under test must be an ALLOW."""
    import grpc

    from sidecar.api.v1 import spendkeeper_pb2 as pb

    for name, server in servers.items():
        if name == "echo":
            continue
        big = name == "big"
        template = authorize_templates(big)[0]
        with grpc.insecure_channel(server.target) as channel:
            call = channel.unary_unary(AUTHORIZE, request_serializer=None,
                                       response_deserializer=None)
            raw = call(b"\n\x05check" + template, timeout=30)
        answer = pb.AuthorizeResponse.FromString(raw)
        if answer.decision != pb.ALLOW:
            raise RuntimeError(f"{name}: the benchmark request is not allowed: {answer}")


def response_size(ctx: Context) -> int:
    """Serialized size of the AuthorizeResponse the sidecar sends for the benchmark request."""
    if "response_size" not in ctx.sections.setdefault("grpc", {}):
        service, ledger = _servicer(ctx, "size")
        try:
            request = _parsed_requests(1, "size")[0]
            size = len(service.Authorize(request, None).SerializeToString())
        finally:
            ledger.close()
        ctx.sections["grpc"]["response_size"] = size
    return int(ctx.sections["grpc"]["response_size"])


def _servicer(ctx: Context, name: str) -> tuple[Any, Any]:
    from prometheus_client import CollectorRegistry

    from policy.compile import load
    from sidecar.ledger import Ledger
    from sidecar.metrics import Metrics
    from sidecar.service import PolicyHolder, SpendKeeperService

    ledger = Ledger(ctx.root / f"inproc-{name}", map_size=1 << 30)
    service = SpendKeeperService(PolicyHolder(load(ctx.policy("small"))), ledger,
                                 Metrics(CollectorRegistry()))
    return service, ledger


def _parsed_requests(count: int, prefix: str) -> list[Any]:
    from sidecar.api.v1 import spendkeeper_pb2 as pb

    templates = authorize_templates()
    out = []
    for i in range(count):
        rid = f"{prefix}-{i}".encode()
        out.append(pb.AuthorizeRequest.FromString(b"\n" + bytes((len(rid),)) + rid
                                                  + templates[i % len(templates)]))
    return out


# ---------------------------------------------------------------------- sections
def section_ledger(ctx: Context) -> None:
    """In-process Authorize latency and durable Record (bench/ledger_bench.py)."""
    say("== ledger: in-process Authorize (decision + LMDB commit) and durable Record")
    result = ledger_bench.run(ctx.quick, ctx.root, record_runs=ctx.sizes.record_runs)
    ctx.sections["ledger"] = result
    a = result["authorize"]
    runs = a["runs"]
    limits: dict[str, tuple[str, Callable[[float], bool] | None]] = {
        "p50": ("<= 10 us", lambda v: v <= 10.0), "p99": ("<= 25 us", lambda v: v <= 25.0),
        "p999": ("", None)}
    for name, (target, check) in limits.items():
        low, high = a[f"{name}_us_spread"]
        ctx.add(f"inproc_authorize_{name}_us",
                f"Authorize in-process {'p99.9' if name == 'p999' else name}", "us",
                Spread(a[f"{name}_us"], low, high, runs), target=target, check=check,
                note=f"{a['calls']:,} calls x {runs} runs")
    for r in result["record"]:
        threads = r["threads"]
        low, high = r["per_s_spread"]
        ctx.add(f"inproc_record_c{threads}_per_s", f"Record in-process durable, {threads} thr",
                "rec/s", Spread(r["per_s"], low, high, r["runs"]),
                note=f"{r['per_fsync']:.1f} records/fsync")
        low, high = r["p99_ms_spread"]
        ctx.add(f"inproc_record_c{threads}_p99_ms", f"Record in-process p99, {threads} thr",
                "ms", Spread(r["p99_ms"], low, high, r["runs"]), target="<= 2 ms",
                check=lambda v: v <= 2.0)


def section_metrics(ctx: Context) -> None:
    """The observer's cost per call against an empty function with the same arguments."""
    from prometheus_client import CollectorRegistry

    from bench.ledger_bench import _requests
    from policy.compile import load
    from sidecar.ledger import Ledger
    from sidecar.metrics import Metrics

    say("== metrics: Metrics.authorized / recorded per call, minus an empty call")
    calls = ctx.sizes.metrics_calls
    ledger = Ledger(ctx.root / "metrics", map_size=1 << 28)
    try:
        policy = load(ctx.policy("small"))
        req_a, req_r = _requests("metrics", 2)
        auth = ledger.authorize(policy, req_a)
        rec = ledger.record(policy, req_r)
    finally:
        ledger.close()
    metrics = Metrics(CollectorRegistry())

    def empty(req: Any, result: Any, seconds: float) -> None:
        pass

    def per_call(fn: Callable[[Any, Any, float], None], req: Any, result: Any) -> float:
        fn(req, result, 0.0002)  # first call makes the thread's shard
        started = time.thread_time_ns()  # CPU time: immune to other processes' load
        for _ in itertools.repeat(None, calls):
            fn(req, result, 0.0002)
        return (time.thread_time_ns() - started) / calls / 1000

    details: dict[str, Any] = {"calls": calls, "runs": []}
    rows: dict[str, list[float]] = {"authorized": [], "recorded": []}
    for _ in range(5):
        base = per_call(empty, req_a, auth)
        a = per_call(metrics.authorized, req_a, auth)
        r = per_call(metrics.recorded, req_r, rec)
        rows["authorized"].append(a - base)
        rows["recorded"].append(r - base)
        details["runs"].append({"empty_us": base, "authorized_us": a, "recorded_us": r})
    ctx.sections["metrics"] = details
    for name, values in rows.items():
        ctx.add(f"metrics_{name}_us", f"Metrics.{name} overhead per call", "us", values,
                target="<= 1 us", check=lambda v: v <= 1.0,
                note=f"CPU time, {calls:,} calls x 5, minus an empty call")


def section_policy(ctx: Context) -> None:
    """Loading the generated big policy (in this process, like a reload)."""
    from policy.compile import load

    members = ctx.sizes.policy_members
    say(f"== policy: load {members:,} members x 100 models")
    path = ctx.policy("big")
    timings = []
    for _ in range(ctx.sizes.policy_loads):
        gc.collect()
        started = time.perf_counter()
        policy = load(path)
        timings.append(time.perf_counter() - started)
        del policy
    files = sorted(p.name for p in path.glob("*.spend"))
    ctx.sections["policy"] = {"members": members, "models": 100, "files": files,
                              "bytes": sum(p.stat().st_size for p in path.glob("*.spend")),
                              "seconds": timings}
    ctx.add("policy_load_s", f"Policy load {members:,} members x 100 models", "s", timings,
            target="< 2 s", check=lambda v: v < 2.0,
            note="one org" + (" (quick: 1,000 members)" if ctx.quick else ""))


def section_grpc(ctx: Context) -> None:
    """Closed loop over loopback: server model sweep, then Authorize/Record/echo side by side."""
    sizes = ctx.sizes
    details = ctx.sections.setdefault("grpc", {})
    details["pinning"] = {"server_cpus": SERVER_CPUS, "client_cpus": CLIENT_CPUS}
    auth_t = authorize_templates()
    say(f"== grpc: server model sweep (Authorize, 32 in flight, {sizes.reps} x "
        f"{sizes.duration} s; server on CPU {SERVER_CPUS}, clients on CPU {CLIENT_CPUS})")
    models = [*(f"sync{t}" for t in SWEEP_THREADS), "aio"]
    sweep: dict[str, list[Sample]] = {m: [] for m in models}
    for _ in range(sizes.reps):
        for name in models:
            server = ctx.servers[name]
            sample = measure(ctx, server, closed_jobs(ctx, server, AUTHORIZE, auth_t, 32,
                                                      CLIENT_CPUS))
            sweep[name].append(sample)
            say(f"  {name:>7}  {sample.result.per_s:8,.0f} calls/s  p99 "
                f"{percentile(sample.result.latencies_ns, 99) / 1e6:6.2f} ms  server cpu "
                f"{sum(sample.server_cpu):.2f}  client cpu {sample.client_max:.2f}  others "
                f"{sample.others:.2f}")
    # Picked by calls per server CPU second (capacity per core): unlike calls/s, it does
    # not drop when other processes on this shared machine steal the server's core.
    medians = {m: spread(s.capacity for s in sweep[m]).median for m in models}
    best = max((m for m in models if m.startswith("sync")), key=lambda m: medians[m])
    ctx.threads = int(best.removeprefix("sync"))
    details["sweep"] = {m: [s.summary() for s in sweep[m]] for m in models}
    details["picked_threads"] = ctx.threads
    for name in models:
        label = (f"Server model sync threads={name.removeprefix('sync')}" if name != "aio"
                 else "Server model grpc.aio (servicer inline)")
        ctx.add(f"server_{name}_authorize_per_s", label, "calls/s",
                [s.result.per_s for s in sweep[name]],
                note=f"{medians[name]:,.0f} calls per server CPU-second"
                     + ("; picked" if name == best else "")
                     + ("; beats the best sync" if name == "aio" and medians["aio"] > medians[best]
                        else ""))
    say(f"  picked: sync server with {ctx.threads} threads")

    _servicer_cost(ctx)

    say(f"== grpc: closed loop Authorize / Record / bare echo at {CONCURRENCY} in flight, "
        f"interleaved, {sizes.reps} x {sizes.duration} s each")
    sidecar = ctx.servers[best]
    echo = ctx.servers["echo"]
    rec_t = record_templates()
    kinds = {"authorize": (sidecar, AUTHORIZE, auth_t), "echo": (echo, ECHO, auth_t),
             "record": (sidecar, RECORD, rec_t)}
    samples: dict[tuple[str, int], list[Sample]] = {}
    for _ in range(sizes.reps):
        for conc in CONCURRENCY:
            for kind, (server, method, templates) in kinds.items():
                sample = measure(ctx, server, closed_jobs(ctx, server, method, templates, conc,
                                                          CLIENT_CPUS))
                samples.setdefault((kind, conc), []).append(sample)
                r = sample.result
                say(f"  {kind:>9} c={conc:<2}  {r.per_s:8,.0f} calls/s  p50 "
                    f"{percentile(r.latencies_ns, 50) / 1e6:6.2f} ms  p99 "
                    f"{percentile(r.latencies_ns, 99) / 1e6:6.2f} ms  server cpu "
                    f"{sum(sample.server_cpu):.2f}  client cpu {sample.client_max:.2f}  others "
                    f"{sample.others:.2f}" + (f"  errors {r.errors}" if r.errors else ""))
    details["closed"] = {f"{k}_c{c}": [s.summary() for s in v] for (k, c), v in samples.items()}
    names = {"authorize": "Authorize", "echo": "bare echo", "record": "Record"}
    for conc in CONCURRENCY:
        for kind in kinds:
            runs = samples[(kind, conc)]
            note = _saturation_note(runs)
            ctx.add(f"grpc_{kind}_c{conc}_per_s", f"gRPC {names[kind]} c={conc} throughput",
                    "calls/s", [s.result.per_s for s in runs], note=note)
            ctx.add(f"grpc_{kind}_c{conc}_p50_ms", f"gRPC {names[kind]} c={conc} p50", "ms",
                    [percentile(s.result.latencies_ns, 50) / 1e6 for s in runs])
            ctx.add(f"grpc_{kind}_c{conc}_p99_ms", f"gRPC {names[kind]} c={conc} p99", "ms",
                    [percentile(s.result.latencies_ns, 99) / 1e6 for s in runs])
        ratios = [a.result.per_s / e.result.per_s for a, e in
                  zip(samples[("authorize", conc)], samples[("echo", conc)], strict=True)]
        saturated = _saturation_note(samples[("echo", conc)])
        ctx.add(f"grpc_authorize_vs_echo_c{conc}_ratio",
                f"Authorize / bare echo throughput c={conc}", "x", ratios,
                target=">= 0.7" if conc == 32 else "",
                check=(lambda v: v >= 0.7) if conc == 32 else None,
                note=f"same run, interleaved; echo {saturated}")
    ratios = [r.result.per_s / a.result.per_s for r, a in
              zip(samples[("record", 32)], samples[("authorize", 32)], strict=True)]
    ctx.add("grpc_record_vs_authorize_c32_ratio", "Record / Authorize throughput c=32", "x",
            ratios, target=">= 0.5", check=lambda v: v >= 0.5, note="durable Record")
    for kind in ("authorize", "echo", "record"):
        runs = samples[(kind, 32)]
        ctx.add(f"grpc_{kind}_server_cpu_us_per_call",
                f"Server CPU per {names[kind]} call (c=32)", "us",
                [sum(s.server_cpu) * s.result.duration / max(s.result.completed, 1) * 1e6
                 for s in runs], note="from /proc/<pid>/stat")
    ratios = [e.server_cpu[0] / e.result.completed / (a.server_cpu[0] / a.result.completed)
              for a, e in zip(samples[("authorize", 32)], samples[("echo", 32)], strict=True)
              if a.server_cpu and e.server_cpu and a.result.completed and e.result.completed]
    ctx.add("grpc_authorize_vs_echo_cpu_ratio", "Authorize / echo capacity per core (CPU)", "x",
            ratios or [0.0], note="echo CPU per call / Authorize CPU per call; immune to "
            "client saturation")
    _breakdown(ctx)


def _servicer_cost(ctx: Context) -> None:
    """The servicer's own Authorize cost in-process (CPU time), and its main parts."""
    from sidecar.convert import request_from

    say("== grpc: servicer Authorize in-process (no gRPC), CPU time per call, and its parts")
    service, ledger = _servicer(ctx, "servicer")
    policy = service.holder.policy
    calls = ctx.sizes.servicer_calls
    clock = time.thread_time_ns  # CPU time of this thread: immune to other processes' load
    parts: dict[str, list[float]] = {"servicer": [], "request_from": [], "ledger": [],
                                     "serialize": []}
    try:
        for run in range(5):
            parsed = _parsed_requests(calls, f"conv{run}")
            now = ledger.clock.now()
            started = clock()
            domain = [request_from(r, r.estimate, "estimate", now, r.allow_clamp)[0]
                      for r in parsed]
            parts["request_from"].append((clock() - started) / calls / 1000)
            started = clock()
            for req in domain:
                ledger.authorize(policy, req, at_given=False)
            parts["ledger"].append((clock() - started) / calls / 1000)
            requests = _parsed_requests(calls, f"svc{run}")
            started = clock()
            answers = [service.Authorize(r, None) for r in requests]
            parts["servicer"].append((clock() - started) / calls / 1000)
            started = clock()
            for a in answers:
                a.SerializeToString()
            parts["serialize"].append((clock() - started) / calls / 1000)
    finally:
        ledger.close()
    ctx.sections.setdefault("grpc", {})["servicer_inproc_us"] = parts
    note = f"CPU time; {calls:,} calls x 5"
    ctx.add("servicer_authorize_inproc_cpu_us", "Servicer Authorize in-process (no gRPC)",
            "us", parts["servicer"], note=f"{note}; serialize adds "
            f"{spread(parts['serialize']).median:.1f} us")
    ctx.add("servicer_request_from_cpu_us", "  of which request_from (validation)", "us",
            parts["request_from"], note=note)
    ctx.add("servicer_ledger_authorize_cpu_us", "  of which Ledger.authorize", "us",
            parts["ledger"], note=f"{note}; the rest builds the response")


def _breakdown(ctx: Context) -> None:
    """Server CPU per gRPC Authorize, split into bare gRPC, servicer and the remainder."""
    fig = {f.key: f.value.median for f in ctx.figures}
    total = fig["grpc_authorize_server_cpu_us_per_call"]
    bare = fig["grpc_echo_server_cpu_us_per_call"]
    servicer = fig["servicer_authorize_inproc_cpu_us"]
    ledger = fig["servicer_ledger_authorize_cpu_us"]
    convert = fig["servicer_request_from_cpu_us"]
    parts = {"server_cpu_per_authorize": total, "bare_grpc_per_call (echo)": bare,
             "ledger_authorize": ledger, "request_from": convert,
             "response_building_and_glue": servicer - ledger - convert,
             "remainder (threads, GIL hand-offs, protobuf (de)serialization)":
                 total - bare - servicer}
    ctx.sections["grpc"]["breakdown_us"] = parts
    say("  server CPU per gRPC Authorize: " + ", ".join(f"{k} {v:.0f} us"
                                                         for k, v in parts.items()))


def section_openloop(ctx: Context) -> None:
    """Latency at fixed offered loads, measured from the scheduled send times."""
    sizes = ctx.sizes
    server = ctx.servers[f"sync{ctx.threads}"]
    templates = authorize_templates()
    say(f"== openloop: Authorize at {', '.join(f'{r:,}' for r in sizes.rates)} calls/s, "
        f"{sizes.reps} x {sizes.open_duration} s (sync server, {ctx.threads} threads, one core)")
    samples: dict[int, list[Sample]] = {r: [] for r in sizes.rates}
    for _ in range(sizes.reps):
        for rate in sizes.rates:
            sample = measure(ctx, server, open_jobs(ctx, server, AUTHORIZE, templates, rate,
                                                    sizes.open_duration, CLIENT_CPUS))
            samples[rate].append(sample)
            r = sample.result
            say(f"  {rate:>6,}/s  achieved {r.within_window_per_s:7,.0f}/s  p50 "
                f"{percentile(r.latencies_ns, 50) / 1e6:6.2f} ms  p99 "
                f"{percentile(r.latencies_ns, 99) / 1e6:6.2f} ms  (service p99 "
                f"{percentile(r.service_ns, 99) / 1e6:.2f} ms)  server cpu "
                f"{sum(sample.server_cpu):.2f}  others {sample.others:.2f}"
                + (f"  errors {r.errors} ({r.error_sample[:60]})" if r.errors else ""))
    ctx.sections["openloop"] = {
        str(rate): [{**s.summary(), "achieved_per_s": s.result.within_window_per_s,
                     "service_p99_ms": percentile(s.result.service_ns, 99) / 1e6}
                    for s in runs] for rate, runs in samples.items()}
    for rate, runs in samples.items():
        name = f"{rate // 1000}k" if rate % 1000 == 0 else str(rate)
        ctx.add(f"openloop_{name}_p50_ms", f"Open loop {rate:,}/s p50", "ms",
                [percentile(s.result.latencies_ns, 50) / 1e6 for s in runs])
        is_target = rate == 3000
        ctx.add(f"openloop_{name}_p99_ms", f"Open loop {rate:,}/s p99 (from schedule)", "ms",
                [percentile(s.result.latencies_ns, 99) / 1e6 for s in runs],
                target="<= 1.5 ms" if is_target else "",
                check=(lambda v: v <= 1.5) if is_target else None,
                note=f"one server core; achieved "
                     f"{spread(s.result.within_window_per_s for s in runs).median:,.0f}/s"
                     + (f", {sum(s.result.errors for s in runs):,} errors"
                        if any(s.result.errors for s in runs) else "")
                     + f"; {_saturation_note(runs)}")


def section_workers(ctx: Context) -> None:
    """``--workers 1`` against ``--workers 2``: Authorize throughput, nothing pinned."""
    sizes = ctx.sizes
    say(f"== workers: --workers 1 vs 2, Authorize 32 in flight over 32 connections, "
        f"{sizes.reps} x {sizes.duration} s; NOTHING pinned: the load generator shares the "
        f"same {len(ALL_CPUS)} cores")
    templates = authorize_templates()
    samples: dict[int, list[Sample]] = {1: [], 2: []}
    for _ in range(sizes.reps):
        for workers in (1, 2):
            server = ctx.servers[f"workers{workers}"]
            sample = measure(ctx, server, closed_jobs(ctx, server, AUTHORIZE, templates, 32,
                                                      None, channels=16))
            samples[workers].append(sample)
            say(f"  workers={workers}  {sample.result.per_s:8,.0f} calls/s  server cpu "
                f"{' + '.join(f'{c:.2f}' for c in sample.server_cpu)}  client cpu "
                f"{' + '.join(f'{c:.2f}' for c in sample.result.client_cpu)}  other processes "
                f"{sample.others:.2f}")
    ctx.sections["workers"] = {str(w): [s.summary() for s in runs] for w, runs in samples.items()}
    for workers, runs in samples.items():
        ctx.add(f"workers{workers}_authorize_per_s", f"--workers {workers} Authorize c=32",
                "calls/s", [s.result.per_s for s in runs],
                note=f"{_saturation_note(runs, pinned=False)}; server "
                     f"{spread(sum(s.server_cpu) for s in runs).median:.2f} cores, other "
                     f"processes {spread(s.others for s in runs).median:.2f}")
    ratios = [b.result.per_s / a.result.per_s for a, b in zip(samples[1], samples[2],
                                                              strict=True)]
    busy = spread(s.machine_busy for s in samples[2]).median
    ctx.add("workers_scaling_ratio", "--workers 2 / --workers 1 throughput", "x", ratios,
            target=">= 1.7", check=lambda v: v >= 1.7,
            note=f"client shares the cores; machine busy {busy:.2f} of {len(ALL_CPUS)} cores")
    efficiency = [b.capacity / a.capacity if a.capacity else 0.0
                  for a, b in zip(samples[1], samples[2], strict=True)]
    ctx.add("workers_cpu_efficiency_ratio", "--workers 2 / 1 calls per server CPU-second", "x",
            efficiency, note="1.0 = a second process costs nothing extra (shared LMDB, port)")


_RELOADED = re.compile(r"policy reloaded: .* in ([0-9.]+) ms")


def section_reload(ctx: Context) -> None:
    """Open-loop load against the big policy: a steady baseline, then repeated SIGHUP reloads.

    A call is "inside" a reload when it was in flight at any moment between the start of
    the reload (the server logs how long it took) and the moment its log line appeared.
    The baseline is every call that finished before the first reload was signalled.
    """
    sizes = ctx.sizes
    server = ctx.servers["big"]
    say(f"== reload: {sizes.reload_rate:,} calls/s open loop for {sizes.reload_duration} s "
        f"against a {sizes.policy_members:,}-member policy: {sizes.reload_baseline} s steady, "
        f"then SIGHUP reloads with {sizes.reload_settle} s between")
    windows: list[tuple[int, int, float]] = []
    first_signal: list[int] = []

    def reloads(start_ns: int, end_ns: int) -> None:
        _sleep_until(start_ns + int(sizes.reload_baseline * _NS))
        seen = len(_RELOADED.findall(server.stderr()))
        longest = 0.0
        while not windows or (time.monotonic_ns() + int((longest + sizes.reload_settle) * _NS)
                              < end_ns):
            sent = time.monotonic_ns()
            first_signal.append(sent)
            server.signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                found = _RELOADED.findall(server.stderr())
                if len(found) > seen:
                    seen = len(found)
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError("the server did not log a reload within 60 s")
            noticed = time.monotonic_ns()
            took_ms = float(found[-1])
            longest = max(longest, took_ms / 1000 + 0.25)
            windows.append((max(sent, noticed - int((took_ms + 30) * 1e6)), noticed, took_ms))
            _sleep_until(noticed + int(sizes.reload_settle * _NS))

    sample = measure(ctx, server, open_jobs(ctx, server, AUTHORIZE, authorize_templates(True),
                                            sizes.reload_rate, sizes.reload_duration,
                                            CLIENT_CPUS), during=reloads)
    if not windows:
        raise RuntimeError("no reload happened during the measurement")
    first = first_signal[0]
    inside: list[list[int]] = [[] for _ in windows]
    baseline: list[int] = []
    between: list[int] = []
    for scheduled, latency in sample.result.timeline:
        finished = scheduled + latency
        hit = next((i for i, (w0, w1, _) in enumerate(windows)
                    if scheduled <= w1 and finished >= w0), None)
        if hit is not None:
            inside[hit].append(latency)
        elif finished < first:
            baseline.append(latency)
        else:
            between.append(latency)
    baseline.sort()
    between.sort()
    steady_p99 = percentile(baseline, 99) / 1e6
    window_p99 = [percentile(sorted(v), 99) / 1e6 for v in inside if v]
    everything_inside = sorted(x for v in inside for x in v)
    between_p99 = percentile(between, 99) / 1e6
    ctx.sections["reload"] = {
        "reload_ms": [w[2] for w in windows], "calls_inside": [len(v) for v in inside],
        "calls_baseline": len(baseline), "baseline_p99_ms": steady_p99,
        "window_p99_ms": window_p99, "between_reloads_p99_ms": between_p99,
        "calls_between": len(between),
        "inside_p99_ms": percentile(everything_inside, 99) / 1e6,
        "inside_max_ms": (everything_inside[-1] / 1e6) if everything_inside else 0.0,
        "errors": sample.result.errors, "achieved_per_s": sample.result.within_window_per_s,
        "server_cpu": sample.server_cpu, "client_cpu": sample.result.client_cpu,
        "other_processes_cpu": sample.others}
    say(f"  {len(windows)} reloads ({', '.join(f'{w[2]:.0f}' for w in windows)} ms in-server); "
        f"baseline p99 {steady_p99:.2f} ms over {len(baseline):,} calls; p99 inside reloads "
        f"{', '.join(f'{p:.2f}' for p in window_p99)} ms; between reloads {between_p99:.2f} ms")
    ctx.add("reload_duration_ms", "Policy reload in the server (under load)", "ms",
            [w[2] for w in windows], note=f"{sizes.policy_members:,} members")
    ctx.add("reload_steady_p99_ms", f"p99 at {sizes.reload_rate:,}/s before any reload", "ms",
            [steady_p99], note=f"{len(baseline):,} calls")
    ctx.add("reload_window_p99_ms", f"p99 at {sizes.reload_rate:,}/s during reloads", "ms",
            window_p99, note=f"one value per reload; between reloads {between_p99:.2f} ms")
    ctx.add("reload_p99_ratio", "p99 during reload / steady p99", "x",
            [p / steady_p99 if steady_p99 else 0.0 for p in window_p99], target="<= 2",
            check=lambda v: v <= 2.0, note="per reload window")


RUNNERS: dict[str, Callable[[Context], None]] = {
    "ledger": section_ledger, "metrics": section_metrics, "policy": section_policy,
    "grpc": section_grpc, "openloop": section_openloop, "workers": section_workers,
    "reload": section_reload,
}
_NEED_SERVERS = ("grpc", "openloop", "workers", "reload")


@contextlib.contextmanager
def context(quick: bool, directory: str | None = None) -> Iterator[Context]:
    """A context with its temp dir; servers and clients are stopped on exit."""
    root = Path(tempfile.mkdtemp(prefix="spendkeeper-bench-", dir=directory))
    ctx = Context(quick, root)
    try:
        yield ctx
    finally:
        ctx.close()
        shutil.rmtree(root, ignore_errors=True)


def run_sections(ctx: Context, names: Sequence[str]) -> dict[str, float]:
    """Run the sections in ``names`` (in suite order); returns seconds per section."""
    timings: dict[str, float] = {}
    wanted = [n for n in SECTIONS if n in names]
    serving = [n for n in wanted if n in _NEED_SERVERS]
    pending: dict[str, ServerProc] = {}
    if ctx.quick and serving:
        # Quick: every server starts at once, while the in-process sections run (their
        # figures are not comparable anyway), and all use the default thread count.
        try:
            pending = start_servers(ctx, serving)
        except Exception as exc:
            ctx.errors["servers"] = f"{type(exc).__name__}: {exc}"
            say(f"!! starting servers failed:\n{traceback.format_exc()}")
    # Full run: the in-process sections come first, while no server runs; the grpc
    # section's servers start together, then the later sections' servers once grpc has
    # picked the thread count they use.
    for index, name in enumerate(wanted):
        started = time.perf_counter()
        try:
            if name in _NEED_SERVERS:
                need = ["grpc"] if name == "grpc" else [n for n in wanted[index:] if n in serving]
                pending.update(start_servers(ctx, need))
                if pending:
                    launched, pending = pending, {}
                    await_servers(ctx, launched)
                    timings[f"start servers ({name})"] = time.perf_counter() - started
                    started = time.perf_counter()
            RUNNERS[name](ctx)
        except Exception as exc:  # report it, and go on with the other sections
            ctx.errors[name] = f"{type(exc).__name__}: {exc}"
            ctx.sections.setdefault(name, {})["error"] = ctx.errors[name]
            say(f"!! section {name} failed:\n{traceback.format_exc()}")
        timings[name] = time.perf_counter() - started
    return timings


def meta(ctx: Context, names: Sequence[str], seconds: float) -> dict[str, Any]:
    """Run-level facts for the JSON."""
    import platform

    import grpc

    return {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": ctx.quick, "sections": list(names), "seconds": round(seconds, 1),
            "cpus": len(ALL_CPUS), "python": platform.python_version(),
            "grpcio": grpc.__version__, "load_average": os.getloadavg(),
            "pinning": {"server_cpus": SERVER_CPUS, "client_cpus": CLIENT_CPUS,
                        "workers_section": "unpinned"},
            "server_threads_used": ctx.threads,
            "client_processes": ctx.loadgen.size if ctx._loadgen is not None else 0}

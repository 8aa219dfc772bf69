"""All state shared by the server's processes, in one module: the HTTP process (uvicorn, forked
from the main one), the main process (LitServe's manager and our signal handling) and the
inference workers (spawned). Requests and cancels travel on LitServe's own queues; what else
crosses a process boundary is here:

- ``SharedState``: counters the main and HTTP processes share (``multiprocessing.Value``): generate
  requests in flight, draining.
- ``WorkerStatus``: each worker's status file in the runtime folder (``workers/<pid>.json``): its
  pid, its role, and whether it is loading, idle or busy, and since when. ``/ready`` reads them,
  and the text routes watch the text worker's pid while they wait, so that a request whose worker
  died ends with a 503 (LitServe 0.2.19 would leave it waiting, ``shared/litserve.md``).
- ``worker_metrics``: the workers' Prometheus metrics (the text worker's batch, tokens and
  cancels, every worker's policy hits) in ``prometheus_client``'s multiprocess mode, one file set
  per worker under ``metrics/`` (``share_worker_metrics``), which ``/metrics`` in the HTTP process
  reads at scrape time (``WorkerMetricsCollector``).
- ``PolicyReload``: the HTTP process's signal to the workers that the policies file was reloaded.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part:
    into a temporary file beside it, then renamed over it (safe with several writers)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def release_free_memory() -> None:
    """Hand memory the process has freed back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op). glibc keeps freed blocks for reuse, so without this a worker's RSS ratchets up with
    every new mix of batch shapes and after ``pack_linears`` still counts the unpacked weights
    (measured: 1398 MiB -> 996 MiB for the default model). Costs milliseconds: called after a
    batch, not per step."""
    global _trim
    if _trim is None:
        try:
            import ctypes

            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children, theirs, ...), read from /proc (empty without it)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def stop_process_group(proc, sig: int = signal.SIGTERM, wait_s: float = 40.0) -> None:
    """Stop a server started in a session of its own (``subprocess.Popen(...,
    start_new_session=True)``, as tests and benchmarks start one): ``sig`` to its whole process
    group, then SIGKILL if it has not exited after ``wait_s`` seconds."""
    os.killpg(proc.pid, sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class WorkerStatus:
    """The status file of one inference worker, ``<runtime_dir>/workers/<pid>.json``.

    Args:
        runtime_dir: the server's runtime folder.
        role: what the worker serves: "text" (the text worker), "search" (concept search's
            gradient worker), "images".
    """

    def __init__(self, runtime_dir: str, role: str):
        self.dir = Path(runtime_dir) / "workers"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        self.role = role
        self.path = self.dir / f"{self.pid}.json"

    def write(self, state: str, requests: list[str] = ()) -> None:
        """Record ``state`` ("loading", "idle", "busy", or "standby": started, its model not loaded
        until first use), and ``requests`` (short names of the requests held, where a worker lists
        them), atomically: written aside, then renamed."""
        write_atomic(self.path, json.dumps({"pid": self.pid, "role": self.role, "state": state, "since": time.time(),
                                            "requests": list(requests)}))


def read_workers(runtime_dir: str) -> list[dict]:
    """Every worker status ever written in ``runtime_dir`` (dead workers' too), with ``alive``."""
    out = []
    for p in (Path(runtime_dir) / "workers").glob("*.json"):
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        d["alive"] = pid_alive(int(d.get("pid", -1)))
        out.append(d)
    return out


class SharedState:
    """Counters and flags shared by the main and HTTP processes (created before uvicorn forks).

    Attributes:
        runtime_dir: the folder of worker status files.
        in_flight: generate requests admitted and not yet answered.
        draining: set on SIGTERM: new requests get 503, in-flight ones finish.
    """

    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.in_flight = mp.Value("i", 0)
        self.draining = mp.Value("b", 0)


def text_worker_pid(runtime_dir: str) -> int | None:
    """The pid of the live text worker (its status file), None before it started or while it is
    being restarted."""
    live = [w for w in read_workers(runtime_dir) if w["alive"] and w.get("role") == "text"]
    return int(max(live, key=lambda w: w["since"])["pid"]) if live else None


class PolicyReload:
    """The policies-reload signal: the HTTP process reloads and checks the policies file, then
    ``send``s; each worker compares ``mark()`` with what it saw last and reloads when it changed
    (``<runtime_dir>/policies.reload``, its modification time)."""

    FILE = "policies.reload"

    def __init__(self, runtime_dir: str | None):
        self.path = Path(runtime_dir) / self.FILE if runtime_dir else None

    def send(self, generation: int) -> None:
        """Tell the workers that the policies' ``generation`` is in force."""
        if self.path is not None:
            write_atomic(self.path, str(generation))

    def mark(self) -> int | None:
        """The signal's state (None: never sent, or no runtime folder)."""
        try:
            return os.stat(self.path).st_mtime_ns if self.path is not None else None
        except OSError:
            return None


METRICS_DIR = "metrics"
"""The runtime folder's subfolder of the workers' metrics files (``prometheus_client``'s
multiprocess mode: ``counter_<pid>.db``, ``gauge_livesum_<pid>.db``)."""


def share_worker_metrics(runtime_dir: str) -> Path:
    """Before any worker is spawned: put the workers' metrics in multiprocess mode, in
    ``<runtime_dir>/metrics`` (emptied). Every process started after this inherits
    ``PROMETHEUS_MULTIPROC_DIR``; the calling process and the HTTP process forked from it keep
    single-process metrics (``prometheus_client`` chose when it was first imported, which the
    server's modules did). The folder."""
    import prometheus_client  # noqa: F401  (imported first, so this process stays single-process)

    folder = Path(runtime_dir) / METRICS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.db"):
        f.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


@dataclass
class WorkerMetrics:
    """A worker's Prometheus metrics (``worker_metrics``); gauges sum over the live workers."""

    batch_rows: object  # Gauge: rows the text worker's engine decodes now
    running_requests: object  # Gauge: requests those rows belong to
    queued: object  # Gauge: requests waiting to join the batch
    cancelled: object  # Counter: requests dropped because their client went away
    tokens: object  # Counter: tokens the text worker generated (rate(): tokens/s)
    policy_hits: object  # Counter{policy, action}: completions a safety policy fired on


_worker_metrics: WorkerMetrics | None = None


def worker_metrics() -> WorkerMetrics:
    """This process's ``WorkerMetrics``, created on first use (in a worker spawned after
    ``share_worker_metrics``, they land in the shared folder; elsewhere, e.g. a worker built in a
    test's process, they stay in memory)."""
    global _worker_metrics
    if _worker_metrics is None:
        from prometheus_client import Counter, Gauge

        live = {"multiprocess_mode": "livesum"}
        _worker_metrics = WorkerMetrics(
            batch_rows=Gauge("saesteer_batch_rows", "rows the text worker's engine is decoding now (a compare "
                             "request is two)", **live),
            running_requests=Gauge("saesteer_running_requests", "requests whose rows are decoding now", **live),
            queued=Gauge("saesteer_queued_requests", "requests waiting to join the text worker's batch", **live),
            cancelled=Counter("saesteer_cancelled_requests", "requests dropped because their client went away"),
            tokens=Counter("saesteer_engine_tokens", "tokens the text worker generated (rate(): tokens/s)"),
            policy_hits=Counter("saesteer_policy_hits", "completions a safety policy fired on (flagged, steered or "
                                "refused), by policy and action", ["policy", "action"]),
        )
    return _worker_metrics


class WorkerMetricsCollector:
    """A collector for the HTTP process's registry: the workers' metrics files, read at scrape time
    (``prometheus_client.multiprocess``), counters summed over every worker that ever ran (a
    restarted worker's counts stay counted), gauges over the live ones."""

    def __init__(self, runtime_dir: str):
        self.runtime_dir = runtime_dir
        self.folder = Path(runtime_dir) / METRICS_DIR

    def collect(self):
        from prometheus_client import multiprocess

        if not self.folder.is_dir():
            return []
        for w in read_workers(self.runtime_dir):
            if not w["alive"]:
                multiprocess.mark_process_dead(int(w["pid"]), str(self.folder))  # drops its live gauges
        return multiprocess.MultiProcessCollector(None, path=str(self.folder)).collect()

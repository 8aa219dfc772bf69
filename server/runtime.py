"""State shared by the server's processes: the HTTP process (uvicorn, forked from the main one),
the main process (LitServe's manager and our signal handling) and the inference workers (spawned).

Each worker writes a small status file into the runtime folder (``WorkerStatus``): its pid, its
role, and whether it is loading, idle or busy, and since when. ``/ready`` reads them, and the
text routes watch the text worker's pid while they wait, so that a request whose worker died
ends with a 503 (LitServe 0.2.19 would leave it waiting, ``shared/litserve.md``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path


def request_fingerprint(request) -> str:
    """A short hash of a ``GenerateRequest``'s canonical JSON: how the audit log names a request
    without writing its prompt."""
    return hashlib.sha1(request.model_dump_json().encode()).hexdigest()[:16]


POLICY_HITS_DIR = "policy_hits"
"""The runtime folder's subfolder where each worker counts its policy hits (``<pid>.json``)."""


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

"""Bounded load test of a real ``saesteer serve`` on loopback.

Starts a server on 127.0.0.1 (its own runtime folder, so the workers' pids are known), then N
client threads send generate requests (mixed: plain, steered, compare, sampled, and a share of
invalid ones) until a request count or a time limit is reached. Reports statuses, requests lost
(no HTTP answer at all), latency percentiles and the inference worker's RSS before and after.

    python benchmarks/load_test.py --clients 16 --duration 180 --max-requests 3000

Never points at another host: the server it drives is the one it starts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from saesteer.server.runtime import stop_process_group

SAE = "smollm2-135m-res10-k32"
PROMPTS = ["Tell me something interesting.", "Describe a place you like.", "Name a colour.", "Say hello."]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_pids(runtime: Path) -> list[int]:
    """The live workers' pids (their status files, ``server.runtime.read_workers``)."""
    from saesteer.server.runtime import read_workers

    return [int(w["pid"]) for w in read_workers(str(runtime)) if w["alive"] and rss_mib(int(w["pid"])) is not None]


def second_half_growth(timeline: list, pids: list[int]) -> dict:
    """Each worker's RSS change (MiB) from the sample nearest the run's middle to the last one:
    near 0 once its allocations have levelled off."""
    if len(timeline) < 3:
        return {}
    mid, last = timeline[len(timeline) // 2], timeline[-1]
    return {str(p): round(last[i + 1] - mid[i + 1], 1) for i, p in enumerate(pids)}


def request(rng: random.Random, max_new_tokens: int) -> tuple[str, dict]:
    """A route and a body: a fifth streamed (/v1/generate with stream, or OpenAI chat streamed or
    not, some steered), the rest ``body``."""
    kind = rng.random()
    if kind < 0.1:
        b = body(rng, max_new_tokens)
        return "/v1/generate", {**b, "stream": True}
    if kind < 0.2:
        b = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
             "max_tokens": rng.randint(1, max_new_tokens), "temperature": 0, "stream": rng.random() < 0.5}
        if rng.random() < 0.5:
            b["steering"] = [{"op": "clamp", "sae": SAE, "latent": 3656, "value": rng.uniform(2, 5), "unit": "typical"}]
        return "/v1/chat/completions", b
    return "/v1/generate", body(rng, max_new_tokens)


def body(rng: random.Random, max_new_tokens: int) -> dict:
    kind = rng.random()
    b = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_new_tokens": rng.randint(1, max_new_tokens)}
    if kind < 0.3:
        b["interventions"] = [{"op": "clamp", "sae": SAE, "latent": 3656, "value": rng.uniform(2, 5), "unit": "typical"}]
    elif kind < 0.45:
        b["compare"] = True
        b["interventions"] = [{"op": "add", "sae": SAE, "latent": rng.randrange(4608), "value": 40.0}]
    elif kind < 0.6:
        b.update(temperature=0.8, top_p=0.9, seed=rng.randrange(1000))
    elif kind < 0.7:  # invalid: refused with 422, never generated
        b["interventions"] = [{"op": "clamp", "sae": SAE, "latent": 99999, "value": 1.0}]
    return b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=180, help="seconds of load (at most 900)")
    ap.add_argument("--max-requests", type=int, default=3000, help="stop after this many requests")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=12, help="the server's max_queue (503 past it)")
    ap.add_argument("--rpm", type=float, default=None, help="the server's requests per minute per client (429 past it)")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    a = ap.parse_args()
    duration = min(a.duration, 900)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = Path(tempfile.mkdtemp(prefix="saesteer-load-"))
    env = {**os.environ, "SAESTEER_RUNTIME_DIR": str(runtime / "rt"), "SAESTEER_MAX_QUEUE": str(a.max_queue),
           "SAESTEER_MAX_BATCH_SIZE": "8", "SAESTEER_HOST": "127.0.0.1"}
    if a.rpm:
        env["SAESTEER_RATE_LIMIT_REQUESTS_PER_MINUTE"] = str(a.rpm)
    log = open(runtime / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "saesteer", "serve", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                print(open(runtime / "server.log").read()[-3000:])
                return 1
            time.sleep(1)
        pids = worker_pids(runtime / "rt")
        httpx.post(url + "/v1/generate", json={"prompt": "Hello", "max_new_tokens": 2}, timeout=120)  # warm
        rss_before = {p: rss_mib(p) for p in pids}

        statuses: Counter = Counter()
        kinds: Counter = Counter()
        stream_errors: list[str] = []
        lost: list[str] = []
        latencies: list[float] = []
        lock = threading.Lock()
        sent = 0
        stop_at = time.time() + duration

        def client(i: int):
            nonlocal sent
            rng = random.Random(i)
            with httpx.Client(timeout=300) as c:
                while time.time() < stop_at:
                    with lock:
                        if sent >= a.max_requests:
                            return
                        sent += 1
                    t0 = time.time()
                    path, b = request(rng, a.max_new_tokens)
                    try:
                        r = c.post(url + path, json=b)  # a stream is read to its end
                    except httpx.HTTPError as e:
                        with lock:
                            lost.append(f"{type(e).__name__}: {e}")
                        continue
                    with lock:
                        statuses[r.status_code] += 1
                        kinds[(path, bool(b.get("stream")), r.status_code)] += 1
                        if r.status_code == 200 and b.get("stream") and "event: error" in r.text:
                            stream_errors.append(r.text[-300:])
                        if r.status_code == 200:
                            latencies.append(time.time() - t0)
                    if r.status_code in (429, 503):
                        time.sleep(float(r.headers.get("retry-after", "1")))

        t_start = time.time()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
        for t in threads:
            t.start()
        rss_timeline = []  # (seconds, MiB of each worker) every 15 s: flat or growing?
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=15 / len(threads))
            if pids and (not rss_timeline or time.time() - t_start - rss_timeline[-1][0] >= 15):
                rss_timeline.append((round(time.time() - t_start), *[round(rss_mib(p) or 0, 1) for p in pids]))
        took = time.time() - t_start
        time.sleep(2)
        rss_after = {p: rss_mib(p) for p in pids}
        metrics = httpx.get(url + "/metrics").text if not a.rpm else ""
        latencies.sort()

        def pct(q):
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None

        report = {
            "clients": a.clients, "seconds": round(took, 1), "requests": sent, "statuses": dict(sorted(statuses.items())),
            "lost": len(lost), "lost_examples": lost[:3],
            "ok_per_s": round(statuses[200] / took, 2), "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
            "worker_rss_mib": {str(p): {"before": round(rss_before[p] or 0, 1), "after": round(rss_after[p] or 0, 1)} for p in pids},
            "worker_rss_timeline": rss_timeline,
            "worker_rss_growth_second_half_mib": second_half_growth(rss_timeline, pids),
            "by_route": {f"{p} stream={st} {code}": n for (p, st, code), n in sorted(kinds.items())},
            "stream_error_events": len(stream_errors), "stream_error_examples": stream_errors[:2],
            "unexpected_statuses": sorted(set(statuses) - {200, 422, 429, 503}),
        }
        print(json.dumps(report, indent=2))
        if metrics:
            print("\n".join(line for line in metrics.splitlines() if line.startswith("saesteer_rejections_total")))
        if a.out:
            Path(a.out).write_text(json.dumps(report, indent=2))
        return 0 if not lost and not report["unexpected_statuses"] else 1
    finally:
        stop_process_group(proc)


if __name__ == "__main__":
    sys.exit(main())

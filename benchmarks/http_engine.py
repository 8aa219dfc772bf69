"""The server's one text worker measured over HTTP, side by side with its baselines in one run.

    python benchmarks/http_engine.py [--tokens 128 --out docs/engine.json] [--skip-search]

Starts ``saesteer serve`` (the default model and SAEs) on a free loopback port, then:

1. Batch-1 decode: tokens/s of one greedy request of ``--tokens`` new tokens (EOS ignored) over HTTP
   on ``/v1/generate`` (JSON and SSE) and ``/v1/chat/completions`` (JSON and SSE), against the
   in-process decode of the same weights (``steering.engine.ContinuousBatch`` on the model as the
   server packs it, in this process while the server idles), rounds interleaved; the medians and
   each route's ratio to in-process (issue 32's target: >= 0.9).
2. Short behind long: 4 requests of ``--long`` tokens, then 2 s later 4 of ``--short``; the short
   ones' median latency against their latency alone, for each route and mode (``/v1/generate``
   JSON, SSE, JSON with ``compare``; the chat route JSON and SSE). Target <= 4x.
3. 8 concurrent requests with 8 different steers (clamps and adds on different latents, 32 tokens)
   against the same 8 one by one: the ratio of wall times (target >= 3x).
4. Memory: the RSS of the server's processes, summed, idle after start, at its peak during parts
   1-3, and after the first concept search (which loads the search worker's model copy).
5. Heavy work beside generation (issue 37; unless ``--skip-search``): batch-1 and batch-8
   generation tokens/s alone and while the largest concept search the server admits runs (the
   most positive sentences whose ``search_cost`` stays under ``max_search_tokens``), and that
   search's own time and status; then one search over the limit (its status: 422).

Prints one JSON object (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

SAE = "smollm2-135m-res10-k32"
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Tell me a long story about a lighthouse keeper."
STEERS = [[{"op": "clamp", "sae": SAE, "latent": 3656, "value": v, "unit": "typical"}] for v in (2, 4, 6, 8)] + \
         [[{"op": "add", "sae": SAE, "latent": lat, "value": 20.0}] for lat in (123, 456, 789, 1011)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mib(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, summed (MiB), from /proc."""
    from saesteer.server.runtime import descendants

    total = 0.0
    for p in {pid, *descendants(pid)}:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class Peak(threading.Thread):
    """Samples the server's RSS every 0.2 s; ``peak`` is the largest seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.pid))
            time.sleep(0.2)


def body(route: str, n: int, stream: bool = False, **kw) -> dict:
    msgs = [{"role": "user", "content": kw.pop("prompt", PROMPT)}]
    if route == "/v1/generate":
        return {"messages": msgs, "max_new_tokens": n, "ignore_eos": True, "stream": stream, **kw}
    steer = kw.pop("interventions", [])
    return {"model": MODEL, "messages": msgs, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream,
            "steering": steer, **kw}


def timed(c: httpx.Client, route: str, b: dict) -> float:
    """Seconds until the whole answer (the last SSE line for streams) has arrived."""
    t0 = time.perf_counter()
    if b.get("stream"):
        with c.stream("POST", route, json=b) as r:
            r.raise_for_status()
            for _ in r.iter_lines():
                pass
    else:
        r = c.post(route, json=b)
        r.raise_for_status()
    return time.perf_counter() - t0


def in_process_decoder(tokens: int):
    """A function that decodes ``tokens`` greedy tokens at batch 1 on the weights the server runs
    (float32, ``speed_up`` as ``pack_linears`` does) and returns tokens/s; and the tokenizer."""
    import torch

    from saesteer.modeling.cpu_kernels import speed_up
    from saesteer.modeling.lm import load_model
    from saesteer.steering.engine import ContinuousBatch
    from saesteer.steering.generate import GenerationSpec, render_prompt

    model, tok = load_model()
    speed_up(model, "float32")
    ids = render_prompt(tok, messages=[{"role": "user", "content": PROMPT}])

    def run() -> float:
        with torch.inference_mode():
            e = ContinuousBatch(model, tok)
            t0 = time.perf_counter()
            e.add("a", GenerationSpec(ids, max_new_tokens=tokens, ignore_eos=True))
            while len(e):
                e.step()
            return tokens / (time.perf_counter() - t0)

    run()  # warm-up
    return run, tok


def part_batch1(c: httpx.Client, decode, tokens: int, rounds: int) -> dict:
    modes = {"generate_json": ("/v1/generate", False), "generate_sse": ("/v1/generate", True),
             "chat_json": ("/v1/chat/completions", False), "chat_sse": ("/v1/chat/completions", True)}
    got: dict[str, list[float]] = {"in_process": [], **{m: [] for m in modes}}
    for name, (route, stream) in modes.items():
        timed(c, route, body(route, 8, stream))  # warm-up
    for _ in range(rounds):
        got["in_process"].append(decode())
        for name, (route, stream) in modes.items():
            got[name].append(tokens / timed(c, route, body(route, tokens, stream)))
    med = {k: statistics.median(v) for k, v in got.items()}
    return {"tokens": tokens, "rounds": rounds, "tok_s": {k: round(v, 2) for k, v in med.items()},
            "all": {k: [round(x, 2) for x in v] for k, v in got.items()},
            "ratio_to_in_process": {k: round(v / med["in_process"], 3) for k, v in med.items() if k != "in_process"}}


def part_head_of_line(c: httpx.Client, long: int, short: int) -> dict:
    modes = {"generate_json": ("/v1/generate", False, {}), "generate_sse": ("/v1/generate", True, {}),
             "generate_json_compare": ("/v1/generate", False, {"compare": True}),
             "chat_json": ("/v1/chat/completions", False, {}), "chat_sse": ("/v1/chat/completions", True, {})}
    out = {}
    for name, (route, stream, extra) in modes.items():
        shorts = [body(route, short, stream, prompt=f"Say something about the number {i}.", **extra) for i in range(4)]
        alone = statistics.median(timed(c, route, b) for b in shorts)
        with ThreadPoolExecutor(8) as ex:
            longs = [ex.submit(timed, c, route, body(route, long, stream, **extra)) for _ in range(4)]
            time.sleep(2.0)
            behind = [ex.submit(timed, c, route, b) for b in shorts]
            waited = statistics.median(f.result() for f in behind)
            for f in longs:
                f.result()
        out[name] = {"alone_s": round(alone, 3), "behind_long_s": round(waited, 3), "ratio": round(waited / alone, 2)}
    return {"long": long, "short": short, "modes": out}


def part_concurrent_steers(c: httpx.Client, tokens: int = 32) -> dict:
    bodies = [body("/v1/generate", tokens, interventions=s, prompt=f"Tell me about place number {i}.")
              for i, s in enumerate(STEERS)]
    t0 = time.perf_counter()
    for b in bodies:
        timed(c, "/v1/generate", b)
    one_by_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as ex:
        list(ex.map(lambda b: timed(c, "/v1/generate", b), bodies))
    together = time.perf_counter() - t0
    return {"requests": len(bodies), "tokens": tokens, "one_by_one_s": round(one_by_one, 2),
            "concurrent_s": round(together, 2), "speedup": round(one_by_one / together, 2)}


def largest_admitted_search(tok, limit: int) -> tuple[dict, int]:
    """The costliest concept search the server admits: the most positive sentences (horse
    sentences, repeated and numbered) whose ``search_cost`` stays within ``limit``, over one named
    SAE or both default SAEs (one hook point), whichever costs more; its body and cost."""
    from saesteer.steering.concept_mix import search_cost
    from saesteer_client.schema import DEFAULT_MIX_FIT_STEPS

    from saesteer.server.config import DEFAULT_SAE_NAME

    base = ["The horse galloped across the green field at dawn.", "She brushed the pony's mane before the race.",
            "The stallion neighed and kicked at the stable door.", "Riders saddled their horses for the long trail."]
    best = ({}, -1)
    for saes, extra in ((2, {}), (1, {"sae": DEFAULT_SAE_NAME})):
        for n in range(1, 65):
            pos = [f"{base[i % len(base)]} ({i})" for i in range(n)]
            cost = search_cost(tok, pos, [], saes, 1, True, DEFAULT_MIX_FIT_STEPS)
            if cost > limit:
                break
            if cost > best[1]:
                best = ({"positive": pos, **extra}, cost)
    return best


def gen_rate(c: httpx.Client, batch: int, tokens: int = 48) -> float:
    """Aggregate generated tokens/s of ``batch`` concurrent greedy requests."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(batch) as ex:
        list(ex.map(lambda i: timed(c, "/v1/generate", body("/v1/generate", tokens, prompt=f"Tell me a fact {i}.")),
                    range(batch)))
    return batch * tokens / (time.perf_counter() - t0)


def part_search(c: httpx.Client, tok, limit: int) -> dict:
    search, cost = largest_admitted_search(tok, limit)
    gen_rate(c, 8)  # warm-up
    alone = {b: statistics.median(gen_rate(c, b) for _ in range(2)) for b in (1, 8)}
    result: dict = {}

    def run_search():
        t0 = time.perf_counter()
        r = c.post("/v1/concepts/search", json=search, timeout=300)
        result.update(status=r.status_code, seconds=round(time.perf_counter() - t0, 1))

    th = threading.Thread(target=run_search)
    th.start()
    time.sleep(3.0)  # the search worker loads its model and starts
    during = {b: [] for b in (1, 8)}
    while th.is_alive() and len(during[8]) < 2:
        for b in (1, 8):
            if th.is_alive():
                during[b].append(gen_rate(c, b))
    th.join()
    during_med = {b: statistics.median(v) for b, v in during.items() if v}
    # alone again, after: this host's speed drifts over a minute, so alone is measured either side
    alone = {b: statistics.median([alone[b], *(gen_rate(c, b) for _ in range(2))]) for b in (1, 8)}
    t0 = time.perf_counter()
    r = c.post("/v1/concepts/search", json=search, timeout=300)  # again, alone (the model already loaded)
    alone_search = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 1)}
    over = c.post("/v1/concepts/search", json={"positive": search["positive"] * 2}, timeout=60)
    return {"search_sentences": len(search["positive"]), "search_cost": cost, "max_search_tokens": limit,
            "gen_tok_s_alone": {b: round(v, 2) for b, v in alone.items()},
            "gen_tok_s_during_search": {b: round(v, 2) for b, v in during_med.items()},
            "ratio_during_to_alone": {b: round(during_med[b] / alone[b], 3) for b in during_med},
            "search_beside_generation": result, "search_alone": alone_search,
            "over_the_limit": {"status": over.status_code, "detail": over.json().get("detail")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", type=int, default=256)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--only-search", action="store_true", help="part 5 alone (with the in-process tokenizer)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from saesteer.server.config import ServerSettings

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="saesteer-bench-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "saesteer", "serve", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ})
    report: dict = {"machine": f"{os.cpu_count()} CPU cores", "model": MODEL}
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        deadline = time.time() + 300
        while True:
            try:
                if c.get("/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise SystemExit(f"the server did not come up; see {log.name}")
            time.sleep(1)
        time.sleep(3)
        report["rss_idle_mib"] = round(tree_rss_mib(proc.pid))
        peak = Peak(proc.pid)
        peak.start()
        decode, tok = in_process_decoder(a.tokens)
        if not a.only_search:
            report["batch1"] = part_batch1(c, decode, a.tokens, a.rounds)
            report["head_of_line"] = part_head_of_line(c, a.long, a.short)
            report["concurrent_steers"] = part_concurrent_steers(c)
            report["rss_peak_mib"] = round(peak.peak)
        if not a.skip_search:
            report["heavy_work"] = part_search(c, tok, ServerSettings().max_search_tokens)
            report["rss_after_search_mib"] = round(tree_rss_mib(proc.pid))
        peak.stop.set()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

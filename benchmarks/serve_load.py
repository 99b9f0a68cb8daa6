"""Bounded load test of `perpcs serve` on loopback: N users, M generate requests each, C at a time.

It starts the server (a subprocess), assembles N users from histories of the run's data set (users
the server has no recipe for yet: new ones, as far as it knows), then sends the N*M requests with
the server batching (--max-batch B) and again one at a time (--max-batch 1), alternating, and reports
requests/s, p50/p95 latency, the adapter cache's hit rate and whether both modes answer alike.
First, midway through one pass over the requests, it kills the server (SIGKILL) and restarts it, and
checks that every recipe assembled before is still served, byte for byte (recipes are written
atomically to RUN/recipes). The throughput rounds then run on fresh servers with warmed caches.
With --openai the requests go through the real `openai` client to the OpenAI routes, as chat
completions (model = the user), each round once whole and once streamed: it reports requests/s,
p50/p95 latency, completion tokens/s and, streamed, the time to the first token (no restart check).

    python benchmarks/serve_load.py --run RUN --users 4 --requests 4 --concurrency 4
    python benchmarks/serve_load.py --run RUN --users 16 --concurrency 8 --openai
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from perpcs.pipeline import Run
from perpcs.utils import write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`perpcs serve` in a subprocess on 127.0.0.1."""

    def __init__(self, run: Path, args: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from perpcs.cli import app; app()", "serve", "--run", str(run),
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        for _ in range(1200):  # bounded: 10 minutes (a busy machine loads two model copies slowly)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.startup_seconds = time.perf_counter() - t0
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.kill()
        raise RuntimeError("server did not answer /health within 10 minutes")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


async def fire(url: str, jobs: list[dict], concurrency: int, max_new_tokens: int) -> tuple[list[float], dict, float]:
    """Send the generate jobs, `concurrency` at a time; (latencies, outputs by job, wall seconds)."""
    limit = asyncio.Semaphore(concurrency)
    latencies, outputs = [], {}

    async def one(client, i, job):
        async with limit:
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/generate", json={**job, "max_new_tokens": max_new_tokens})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            outputs[i] = r.json()["output"]

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, i, job) for i, job in jobs))
    return latencies, outputs, time.perf_counter() - t0


async def fire_openai(url: str, jobs: list, concurrency: int, max_tokens: int, stream: bool) -> dict:
    """The jobs as chat completions through the openai client, `concurrency` at a time: latencies, times to
    the first token (streamed), completion tokens, outputs by job, wall seconds."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    limit = asyncio.Semaphore(concurrency)
    got: dict = {"latencies": [], "first_token": [], "tokens": 0, "outputs": {}}

    async def one(i, job):
        async with limit:
            t0 = time.perf_counter()
            ask = {"model": job["user"], "messages": [{"role": "user", "content": job["input"]}],
                   "max_tokens": max_tokens, "temperature": 0}
            if stream:
                parts = []
                async for chunk in await client.chat.completions.create(**ask, stream=True,
                                                                        stream_options={"include_usage": True}):
                    if chunk.choices and chunk.choices[0].delta.content:
                        if not parts:
                            got["first_token"].append(time.perf_counter() - t0)
                        parts.append(chunk.choices[0].delta.content)
                    if chunk.usage:
                        got["tokens"] += chunk.usage.completion_tokens
                got["outputs"][i] = "".join(parts)
            else:
                done = await client.chat.completions.create(**ask)
                got["tokens"] += done.usage.completion_tokens
                got["outputs"][i] = done.choices[0].message.content
            got["latencies"].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, job) for i, job in jobs))
    got["wall"] = time.perf_counter() - t0
    await client.close()
    return got


def delta(before: dict, after: dict) -> dict:
    """Change of the server's counters (/health) over a phase."""
    return {k: after[k] - before[k] for k in ("cache_hits", "cache_misses", "batches", "generated")}


def summary(latencies: list[float], wall: float, counts: dict) -> dict:
    q = statistics.quantiles(latencies, n=20)
    hits, misses = counts["cache_hits"], counts["cache_misses"]
    return {"requests": len(latencies), "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(q[18], 3),
            "cache_hit_rate": round(hits / max(1, hits + misses), 3),
            "mean_batch": round(counts["generated"] / max(1, counts["batches"]), 2)}


def plot(rounds: list[dict], path: Path) -> None:
    """Requests/s and p50/p95 latency of each throughput round (and tokens/s, time to first token, if measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['mode'].replace('_', ' ')}{' streamed' if r.get('stream') else ''}\nround {r['round']}"
              for r in rounds]
    x = range(len(rounds))
    extra = "tokens_per_s" in rounds[0]
    fig, axes = plt.subplots(1, 4 if extra else 2, figsize=(18 if extra else 9, 3.4))
    rate, lat = axes[:2]
    if extra:
        tok, first = axes[2:]
        colours = ["C0" if r["mode"] == "batched" else "C1" for r in rounds]
        tok.bar(x, [r["tokens_per_s"] for r in rounds], color=colours)
        tok.set(xticks=list(x), xticklabels=labels, ylabel="completion tokens / s", title="tokens")
        streamed = [(i, r) for i, r in enumerate(rounds) if r.get("stream")]
        first.bar([i - 0.2 for i, _ in streamed], [r["first_token_p50_s"] for _, r in streamed], 0.4, label="p50")
        first.bar([i + 0.2 for i, _ in streamed], [r["first_token_p95_s"] for _, r in streamed], 0.4, label="p95")
        first.set(xticks=list(x), xticklabels=labels, ylabel="seconds", title="time to first token (streamed)")
        first.legend()
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)
    rate.bar(x, [r["requests_per_s"] for r in rounds], color=["C0" if r["mode"] == "batched" else "C1" for r in rounds])
    rate.set(xticks=list(x), xticklabels=labels, ylabel="requests / s", title="throughput")
    lat.bar([i - 0.2 for i in x], [r["p50_s"] for r in rounds], 0.4, label="p50")
    lat.bar([i + 0.2 for i in x], [r["p95_s"] for r in rounds], 0.4, label="p95")
    lat.set(xticks=list(x), xticklabels=labels, ylabel="seconds", title="latency")
    lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, required=True,
                    help="run folder with a pool; recipes are written to RUN/recipes")
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4, help="generate requests per user")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--cache-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="batched/one-at-a-time rounds, alternated")
    ap.add_argument("--openai", action="store_true", help="through the openai client and the OpenAI routes")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/serve-load[-openai].json")
    args = ap.parse_args()
    args.out = args.out or Path(f"benchmarks/results/serve-load{'-openai' if args.openai else ''}.json")

    run = Run(args.run)
    data = run.data
    users = [u for u in data.users if u.user_id not in run.split["targets"]][: args.users]
    names = [f"load-{u.user_id}" for u in users]
    # M requests per user over its own queries (cycled), interleaved across users as a platform sees them
    jobs = list(enumerate({"user": n, "input": u.queries[j % len(u.queries)].input if u.queries else u.history[j].input}
                          for j in range(args.requests) for n, u in zip(names, users)))
    common = ["--cache-size", str(args.cache_size), "--max-new-tokens", str(args.max_new_tokens)]
    result: dict = {"run": str(args.run), "users": args.users, "requests_per_user": args.requests,
                    "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens,
                    "cache_size": args.cache_size,
                    "max_batch": args.max_batch, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                    "rounds": []}

    server = Server(args.run, common + ["--max-batch", str(args.max_batch)])
    result["startup_seconds"] = round(server.startup_seconds, 1)
    assemble_s, recipes = [], {}
    for name, user in zip(names, users):
        t0 = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/users/{name}/assemble", timeout=600,
                       json={"history": [it.model_dump() for it in user.history]})
        r.raise_for_status()
        assemble_s.append(time.perf_counter() - t0)
        recipes[name] = r.json()
    result["assemble_seconds"] = {"mean": round(statistics.mean(assemble_s), 3), "max": round(max(assemble_s), 3),
                                  "history_items": [len(u.history) for u in users]}
    print(f"assembled {len(names)} users, {result['assemble_seconds']['mean']} s each", file=sys.stderr)
    if args.openai:
        server.kill()
        openai_rounds(args, names, jobs, common, result)
        finish(run, names, result, args.out)
        return

    # restart check: half the requests, kill -9, restart, every recipe still served, the other half
    half = len(jobs) // 2
    before = server.health()
    lat1, _, wall1 = asyncio.run(fire(server.url, jobs[:half], args.concurrency, args.max_new_tokens))
    first = delta(before, server.health())
    server.kill()
    server = Server(args.run, common + ["--max-batch", str(args.max_batch)])
    served = {n: httpx.get(f"{server.url}/v1/users/{n}", timeout=60) for n in names}
    lost = [n for n in names if served[n].status_code != 200
            or json.loads(run.recipe_path(n).read_text()) != json.loads(json.dumps(recipes[n]))]
    before = server.health()
    lat2, _, wall2 = asyncio.run(fire(server.url, jobs[half:], args.concurrency, args.max_new_tokens))
    second = delta(before, server.health())
    result["restart"] = {"recipes_before": len(names),
                         "served_after_restart": sum(r.status_code == 200 for r in served.values()),
                         "lost_or_changed": lost, "restart_seconds": round(server.startup_seconds, 1),
                         "before_kill": summary(lat1, wall1, first), "after_restart": summary(lat2, wall2, second)}
    print(json.dumps(result["restart"], indent=2), file=sys.stderr)
    server.kill()

    # throughput: batched and one at a time, alternated, each on a fresh server whose cache is warmed first
    outputs = {}
    for rnd in range(args.rounds):
        for mode, batch in (("batched", args.max_batch), ("one_at_a_time", 1)):
            server = Server(args.run, common + ["--max-batch", str(batch)])
            asyncio.run(fire(server.url, jobs[: len(names)], 1, args.max_new_tokens))  # warm-up: one per user
            before = server.health()
            lat, outputs[rnd, mode], wall = asyncio.run(fire(server.url, jobs, args.concurrency, args.max_new_tokens))
            result["rounds"].append({"round": rnd, "mode": mode, **summary(lat, wall, delta(before, server.health()))})
            print(json.dumps(result["rounds"][-1]), file=sys.stderr)
            server.kill()
    result["outputs_differing_between_modes"] = sum(
        outputs[r, "batched"][i] != outputs[r, "one_at_a_time"][i]
        for r in range(args.rounds) for i in outputs[r, "batched"])
    finish(run, names, result, args.out)


def openai_rounds(args, names: list[str], jobs: list, common: list[str], result: dict) -> None:
    """Batched and one at a time, alternated, each on a fresh server: the jobs whole, then streamed."""
    outputs = {}
    for rnd in range(args.rounds):
        for mode, batch in (("batched", args.max_batch), ("one_at_a_time", 1)):
            server = Server(args.run, common + ["--max-batch", str(batch)])
            asyncio.run(fire_openai(server.url, jobs[: len(names)], 1, args.max_new_tokens, False))  # warm-up
            for stream in (False, True):
                before = server.health()
                got = asyncio.run(fire_openai(server.url, jobs, args.concurrency, args.max_new_tokens, stream))
                outputs[rnd, mode, stream] = got["outputs"]
                row = {"round": rnd, "mode": mode, "stream": stream,
                       **summary(got["latencies"], got["wall"], delta(before, server.health())),
                       "completion_tokens": got["tokens"], "tokens_per_s": round(got["tokens"] / got["wall"], 2)}
                if stream:
                    q = statistics.quantiles(got["first_token"], n=20)
                    row |= {"first_token_p50_s": round(statistics.median(got["first_token"]), 3),
                            "first_token_p95_s": round(q[18], 3)}
                result["rounds"].append(row)
                print(json.dumps(row), file=sys.stderr)
            server.kill()
    first = outputs[0, "batched", False]
    result["outputs_differing_from_round_0_batched"] = sum(o[i] != first[i] for o in outputs.values() for i in first)


def finish(run: Run, names: list[str], result: dict, out: Path) -> None:
    for name in names:  # remove only the recipes this benchmark made
        run.recipe_path(name).unlink(missing_ok=True)
    write_json(out, result)
    plot(result["rounds"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()

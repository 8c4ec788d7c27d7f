"""Judge throughput against the client's concurrency limit: does a slow judge at D seconds per request take
N * D / C seconds for N requests at concurrency C?

    python experiments/bench_judge.py                        # N=64, D=0.2 s, C in 1, 2, 4, 8, 16 (~25 s)
    python experiments/bench_judge.py --requests=256 --concurrency=8,32,64

The judge is a fake OpenAI-compatible server (stdlib `ThreadingHTTPServer`, one thread per connection) that
sleeps D seconds and answers "7" to every chat completion, so the time measured is the reward system's
own: N (task, response) pairs of a judge-only reward spec scored by `RewardSystem.score_many` (the
trainer's interface) through a `JudgeClient(concurrency=C)`, wall time from the call to the last score. The
server also counts the most requests it held at once (it should be C: the client's semaphore). Ideal:
N * D / C. Each C runs with a fresh client (new connections), after one warm-up request.

Output: a table, printed and written with a json of every number to `<out_dir>/judge_throughput_cpu.md|.json`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from glm5v_jax.rl.http_json import JSONHandler
from glm5v_jax.rl.judge import JudgeClient
from glm5v_jax.rl.rewards import RewardSystem
from glm5v_jax.rl.types import Component, RewardSpec, Task
from glm5v_jax.train.writers import json_default

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


class SlowJudge(ThreadingHTTPServer):
    """Answers every chat completion "7" after `delay_s`; counts requests and the most held at once."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, delay_s: float):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.requests = self.in_flight = self.peak = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def reset(self) -> None:
        with self.lock:
            self.requests = self.peak = 0


class _Handler(JSONHandler):
    server: SlowJudge

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        s = self.server
        with s.lock:
            s.requests += 1
            s.in_flight += 1
            s.peak = max(s.peak, s.in_flight)
        time.sleep(s.delay_s)
        with s.lock:
            s.in_flight -= 1
        data = json.dumps({"object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "7"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def measure(server: SlowJudge, requests: int, concurrency: int) -> dict:
    """N judge-only scores through RewardSystem.score_many at one concurrency limit."""
    judge = JudgeClient(server.url, concurrency=concurrency, timeout_s=60.0, retries=0)
    specs = {"caption": RewardSpec((Component("judge", judge="caption"),))}
    tasks = [Task(uid=str(i), data_source="caption", prompt="Describe the image.", reference={"caption": "a circle"})
             for i in range(requests)]
    with RewardSystem(specs, verifiers={}, judge=judge) as rewards:
        rewards.score_many([(tasks[0], "a red circle")])  # warm-up: imports, the first connection
        server.reset()
        rewards.stats(reset=True)
        t0 = time.perf_counter()
        scores = rewards.score_many([(t, "a red circle") for t in tasks])
        seconds = time.perf_counter() - t0
        latency = rewards.stats()["judge/caption"]
    ideal = requests * server.delay_s / concurrency
    return dict(concurrency=concurrency, requests=requests, seconds=seconds, ideal_seconds=ideal,
                ratio=seconds / ideal, requests_per_s=requests / seconds, server_peak_in_flight=server.peak,
                server_requests=server.requests, fallbacks=sum(bool(s.flags) for s in scores),
                mean_judge_seconds=latency["mean_seconds"], max_judge_seconds=latency["max_seconds"])


def run_bench(requests: int, delay_s: float, concurrency: tuple[int, ...], log: Callable[[str], None] = print) -> dict:
    server = SlowJudge(delay_s)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        rows = []
        for c in concurrency:
            rows.append(measure(server, requests, c))
            r = rows[-1]
            log(f"C={c:3d}: {r['seconds']:.2f} s (ideal {r['ideal_seconds']:.2f} s, {r['ratio']:.2f}x), "
                f"peak in flight {r['server_peak_in_flight']}")
    finally:
        server.shutdown()
        server.server_close()
    return dict(requests=requests, delay_s=delay_s, rows=rows)


def report(r: dict) -> str:
    m = r["meta"]
    head = ["C (concurrency)", "N", "measured s", "ideal N*D/C s", "measured / ideal", "requests/s",
            "peak in flight (server)", "mean judge latency s", "fallbacks"]
    lines = ["| " + " | ".join(head) + " |", "|---:" * len(head) + "|"]
    for x in r["rows"]:
        lines.append(f"| {x['concurrency']} | {x['requests']} | {x['seconds']:.2f} | {x['ideal_seconds']:.2f} | "
                     f"{x['ratio']:.2f}x | {x['requests_per_s']:.1f} | {x['server_peak_in_flight']} | "
                     f"{x['mean_judge_seconds']:.3f} | {x['fallbacks']} |")
    return "\n".join([
        f"# Judge throughput against concurrency ({m['host']}, {m['cores']} cores)", "",
        f"{m['date']}, commit {m['commit']}, Python {m['python']}, aiohttp {m['aiohttp']}. Command: "
        f"`python experiments/bench_judge.py {' '.join(m['argv'])}` ({r['wall_s']:.0f} s).", "",
        f"A fake OpenAI-compatible judge (stdlib threaded HTTP server) sleeps D = {r['delay_s']:g} s per request; "
        f"N = {r['requests']} (task, response) pairs of a judge-only reward spec are scored by "
        "`RewardSystem.score_many` through `JudgeClient(concurrency=C)`; wall time from the call to the last "
        "score, after a warm-up request. Ideal: N * D / C. Peak in flight: the most requests the server held at "
        "once (the client's semaphore allows C). Mean judge latency: `RewardSystem.stats()`, seconds from a "
        "judge call to its verdict, the wait for the semaphore included (so about N * D / (2C) when all N start "
        "at once).", "", *lines])


def meta(argv: list[str]) -> dict:
    import os
    import subprocess

    import aiohttp

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "glm5v_jax"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                python=platform.python_version(), aiohttp=aiohttp.__version__, cores=cores,
                host=f"CPU, {platform.machine()} {platform.system()}", argv=list(argv))


def write(result: dict, out_dir: str, log: Callable[[str], None] = print) -> list[str]:
    stem = Path(out_dir) / "judge_throughput_cpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    files = [str(stem) + ".md", str(stem) + ".json"]
    Path(files[0]).write_text(report(result) + "\n")
    Path(files[1]).write_text(json.dumps(result, indent=1, default=json_default) + "\n")
    log(f"wrote {files[0]} and .json")
    return files


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="N: requests per concurrency (default 64)")
    ap.add_argument("--delay_s", type=float, default=0.2, help="D: the judge's seconds per request (default 0.2)")
    ap.add_argument("--concurrency", default="1,2,4,8,16", help="C values, comma-separated")
    ap.add_argument("--out_dir", default=str(RESULTS), help="where the .md and .json go ('' to skip writing)")
    args = ap.parse_args(argv)
    args.concurrency = tuple(int(c) for c in args.concurrency.split(","))
    return args


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = run_bench(args.requests, args.delay_s, args.concurrency, log)
    result["wall_s"] = time.perf_counter() - t0
    result["meta"] = meta(argv)
    log(report(result))
    if args.out_dir:
        result["files"] = write(result, args.out_dir, log)
    return result


if __name__ == "__main__":
    main()

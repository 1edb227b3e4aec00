"""Load test of ``hf-kvcache serve --http`` on loopback, next to the same prompts through the stdin mode.

    python benchmarks/http_load.py            # 32 clients x 8 requests + 48 over the rate limit
    python benchmarks/http_load.py --quick    # 8 clients x 4 requests
    python benchmarks/http_load.py --sequential  # the stdin run's 64 requests over HTTP one at a time, and stdin

The server runs in a child process (``ApiServer`` around ``create_app`` on
``build_service``: stories260K, INT8 cache, prefix store) with one API key
per client. ``--clients`` clients stream greedy completions of a shared
system prompt (about 100 tokens) plus one of eight story openings; a noisy client on a key of its
own fires ``--noisy`` requests at once (over its bucket: 429s expected).
While the middle third of the requests is sent the store fails every lookup
and insert (the breaker opens; requests recompute). Each configuration of
``--batch-sizes`` (``max_batch_size``; 1 = one request per ``generate``) is
one run on a fresh server. Then every distinct prompt is asked alone on a
quiet server, healthy and with the fault on: an answer is correct when it
equals one of these two (the breaker stays open a while after the fault
window, so any answer may have been computed with or without the stored
prefix; the two differ only where reuse itself moves a near tie, see
benchmarks/reuse_agreement.py). The JSON lists lost and wrong answers.

The stdin mode (``hf-kvcache serve`` with lines on stdin) serves the same
normal requests one by one in a child process; latency there is from the
moment all lines are written to each output line (no streaming: no TTFT).
Reported per run: throughput (answers/s), p50/p99 time to first token and
latency, answers lost (no final event) and wrong, 429s. Writes
results/http_load.json and results/http_load.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.records import Recorder, format_table  # noqa: E402

MODEL_PATH = REPO.parent / "shared" / "models" / "stories260K"
SYSTEM = (
    "Once upon a time, there was a kind old storyteller. Every night she told short, happy stories to the children "
    "of the town about animals, toys, parks and friends, and the friends always helped each other. One night she said: "
)
QUESTIONS = ["Once upon a time, there was a cat named", "One day, a little dog went to", "Tom had a big red ball. He",
             "Lily loved to play in the park with", "A small bird sat on a tree and", "Tom and his toy car",
             "The sun was hot, so Mom", "Sue found a shiny box under"]  # fmt: skip
CONFIG = {
    "cache": {"quant_type": "int8", "group_size": 8, "residual_length": 32},
    "prefix_store": {"chunk_size": 32, "max_size_mb": 16},
    "serving": {
        "breaker": {"fail_max": 3, "reset_timeout_s": 2.0},
        "rate_limit": {"enabled": True, "rate_per_s": 1.0, "burst": 16},
    },
}


# ---------------------------------------------------------------------- the server (child process)
def _serve(settings: dict, keys: list[str], port: "mp.Value", fault: "mp.Event", stop: "mp.Event") -> None:
    import torch

    from hf_kvcache_plugin.app.http_api import create_app
    from hf_kvcache_plugin.app.http_serve import ApiServer
    from hf_kvcache_plugin.app.models import load_model
    from hf_kvcache_plugin.app.service import build_service
    from hf_kvcache_plugin.config import parse_config
    from hf_kvcache_plugin.reuse.prefix_store import PrefixStore

    torch.set_num_threads(settings["threads"])

    class FaultyStore(PrefixStore):
        """Lookups and inserts raise while the parent holds ``fault`` set."""

        def lookup(self, *args, **kwargs):
            if fault.is_set():
                raise OSError("injected store fault (lookup)")
            return super().lookup(*args, **kwargs)

        def put_chain(self, *args, **kwargs):
            if fault.is_set():
                raise OSError("injected store fault (insert)")
            return super().put_chain(*args, **kwargs)

    serving = {**CONFIG["serving"], "api": settings["api"]}
    if not settings.get("rate_limit", True):
        serving.pop("rate_limit")
    config = parse_config({**CONFIG, "serving": serving})
    model, tokenizer = load_model(str(MODEL_PATH), "cpu")
    service = build_service(model, config, http=False, store=FaultyStore.from_config(config))
    server = ApiServer(create_app(service, model, tokenizer, "stories260K", config, keys)).start()
    port.value = int(server.url.rsplit(":", 1)[1])
    stop.wait()
    server.stop()
    service.close()


class Server:
    def __init__(self, settings: dict, keys: list[str]):
        ctx = mp.get_context("spawn")
        self.port, self.fault, self.stop = ctx.Value("i", 0), ctx.Event(), ctx.Event()
        self.proc = ctx.Process(target=_serve, args=(settings, keys, self.port, self.fault, self.stop))

    def __enter__(self) -> "Server":
        self.proc.start()
        deadline = time.monotonic() + 300
        while self.port.value == 0:
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port.value}"
        self._process = psutil.Process(self.proc.pid)
        return self

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system): steadier than wall time on a busy machine."""
        times = self._process.cpu_times()
        return times.user + times.system

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


# ---------------------------------------------------------------------- the clients
async def _stream_one(http: httpx.AsyncClient, url: str, key: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, text, done, status, chunks = time.perf_counter(), None, "", False, None, 0
    try:
        async with http.stream("POST", url + "/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {key}"}) as response:  # fmt: skip
            status = response.status_code
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    status = event["error"]["message"]
                for choice in event.get("choices", []):
                    if choice["text"]:
                        first = time.perf_counter() if first is None else first
                        chunks += 1
                    text += choice["text"]
    except httpx.HTTPError as exc:
        status = f"{type(exc).__name__}: {exc}"  # the message too: a lost answer has to say why
    end = time.perf_counter()
    return {"prompt": prompt, "text": text, "done": done, "status": status, "ttft_s": None if first is None else
            first - start, "latency_s": end - start, "chunks": chunks}  # fmt: skip


async def _load(url: str, args: argparse.Namespace, fault: "mp.Event") -> tuple[list[dict], list[int], float]:
    requests = [(c, SYSTEM + QUESTIONS[(c + i) % len(QUESTIONS)]) for i in range(args.per_client)
                for c in range(args.clients)]  # fmt: skip
    total, sent = len(requests), 0
    records: list[dict] = []
    limits = httpx.Limits(max_connections=args.clients + args.noisy + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(c: int) -> None:
            nonlocal sent
            for number in range(args.per_client):
                prompt = SYSTEM + QUESTIONS[(c + number) % len(QUESTIONS)]
                sent += 1
                # the middle third of the requests goes out while the store fails
                if sent == total // 3:
                    fault.set()
                elif sent == 2 * total // 3:
                    fault.clear()
                record = await _stream_one(http, url, f"key-{c}", prompt, args.max_tokens)
                records.append({**record, "client": c, "during_fault": total // 3 <= sent < 2 * total // 3})

        async def noisy() -> list[int]:
            body = {"model": "stories260K", "prompt": SYSTEM + QUESTIONS[0], "max_tokens": 2, "temperature": 0}
            answers = await asyncio.gather(*(http.post(url + "/v1/completions", json=body,
                                                       headers={"Authorization": "Bearer key-noisy"})
                                              for _ in range(args.noisy)))  # fmt: skip
            return [a.status_code for a in answers]

        start = time.perf_counter()
        results = await asyncio.gather(noisy(), *(client(c) for c in range(args.clients)))
        wall = time.perf_counter() - start
    fault.clear()
    return records, results[0], wall


async def _alone(url: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=600) as http:
        return {p: (await _stream_one(http, url, "key-0", p, max_tokens))["text"] for p in prompts}


def _quantile(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def http_run(args: argparse.Namespace, batch: int) -> dict:
    keys = [f"key-{c}" for c in range(args.clients)] + ["key-noisy"]
    settings = {"threads": args.threads, "api": {"max_batch_size": batch, "max_tokens": 64}}
    prompts = sorted({SYSTEM + q for q in QUESTIONS})
    with Server(settings, keys) as server:
        asyncio.run(_alone(server.url, prompts[:1], args.max_tokens))  # warm-up: the shared prefix is stored
        records, noisy, wall = asyncio.run(_load(server.url, args, server.fault))
        # the reference: each prompt alone on the now quiet server, with the store healthy and failing
        healthy = asyncio.run(_alone(server.url, prompts, args.max_tokens))
        server.fault.set()
        time.sleep(0.1)
        failing = asyncio.run(_alone(server.url, prompts, args.max_tokens))
        server.fault.clear()
        metrics = httpx.get(server.url + "/metrics", timeout=60).text
    answered = [r for r in records if r["done"]]
    # the breaker stays open up to reset_timeout_s after the fault window, and a batch in flight straddles its
    # edges: any answer may have been computed with or without the stored prefix
    wrong = [r for r in answered if r["text"] not in (healthy[r["prompt"]], failing[r["prompt"]])]
    opens = re.search(r'hf_kvcache_breaker_opens_total\{breaker="prefix_store"\} (\S+)', metrics)
    return {
        "mode": f"http, max_batch_size {batch}",
        "requests": len(records),
        "answered": len(answered),
        "lost": len(records) - len(answered),
        "wrong": len(wrong),
        "alone_answers_differing_by_store_state": sum(healthy[p] != failing[p] for p in prompts),
        "during_fault": sum(r["during_fault"] for r in records),
        "answers_per_s": len(answered) / wall,
        "ttft_p50_s": _quantile([r["ttft_s"] for r in answered], 0.5),
        "ttft_p99_s": _quantile([r["ttft_s"] for r in answered], 0.99),
        "latency_p50_s": _quantile([r["latency_s"] for r in answered], 0.5),
        "latency_p99_s": _quantile([r["latency_s"] for r in answered], 0.99),
        "noisy_sent": len(noisy),
        "noisy_429": noisy.count(429),
        "noisy_200": noisy.count(200),
        "normal_429": sum(r["status"] == 429 for r in records),
        "breaker_opens": float(opens.group(1)) if opens else 0.0,
        "sse_text_chunks_per_answer": sum(r["chunks"] for r in answered) / max(1, len(answered)),
        "wall_s": wall,
        "latencies_s": sorted(r["latency_s"] for r in answered),
        # what went wrong, to read in the JSON
        "lost_records": [{k: r[k] for k in ("client", "status", "text", "during_fault")} for r in records
                         if not r["done"]],
        "wrong_records": [{"prompt": QUESTIONS.index(r["prompt"][len(SYSTEM):]), "text": r["text"],
                           "alone": healthy[r["prompt"]], "alone_fault": failing[r["prompt"]],
                           "during_fault": r["during_fault"]} for r in wrong],
    }


def _stdin_lines(args: argparse.Namespace) -> list[str]:
    lines = [SYSTEM + QUESTIONS[(c + i) % len(QUESTIONS)] for i in range(args.per_client) for c in range(args.clients)]
    return lines[: args.stdin_requests]


def sequential_run(args: argparse.Namespace) -> dict:
    """The stdin run's requests over HTTP, one at a time from one client (``max_batch_size`` 1, no rate limit,
    no faults, no noisy client): what serving one request after another costs over HTTP."""
    lines = _stdin_lines(args)
    settings = {"threads": args.threads, "api": {"max_batch_size": 1, "max_tokens": 64}, "rate_limit": False}

    async def one_by_one(url: str, cpu_s) -> tuple[list[dict], float, dict[str, float]]:
        async with httpx.AsyncClient(timeout=600) as http:
            await _stream_one(http, url, "key-0", lines[0], args.max_tokens)  # warm-up, as for the other runs
            start, records, server_cpu, client_cpu = time.perf_counter(), [], cpu_s(), time.process_time()
            for prompt in lines:
                records.append(await _stream_one(http, url, "key-0", prompt, args.max_tokens))
            cpu = {"server": cpu_s() - server_cpu, "client": time.process_time() - client_cpu}
            return records, time.perf_counter() - start, cpu

    with Server(settings, ["key-0"]) as server:
        records, wall, cpu = asyncio.run(one_by_one(server.url, server.cpu_s))
    answered = [r for r in records if r["done"]]
    return {
        "mode": "http, one at a time", "requests": len(records), "answered": len(answered),
        "lost": len(records) - len(answered), "answers_per_s": len(answered) / wall,
        "ttft_p50_s": _quantile([r["ttft_s"] for r in answered], 0.5),
        "latency_p50_s": _quantile([r["latency_s"] for r in answered], 0.5),
        "latency_p99_s": _quantile([r["latency_s"] for r in answered], 0.99),
        "sse_text_chunks_per_answer": sum(r["chunks"] for r in answered) / max(1, len(answered)), "wall_s": wall,
        "server_cpu_ms_per_answer": 1e3 * cpu["server"] / max(1, len(answered)),
        "client_cpu_ms_per_answer": 1e3 * cpu["client"] / max(1, len(answered)),
        "latencies_s": sorted(r["latency_s"] for r in answered),
        "lost_records": [{k: r[k] for k in ("status", "text")} for r in records if not r["done"]],
    }  # fmt: skip


def stdin_run(args: argparse.Namespace) -> dict:
    """The same normal requests (no faults, no noisy client) through ``hf-kvcache serve`` on stdin."""
    lines = _stdin_lines(args)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump({k: v for k, v in CONFIG.items() if k != "serving"}, f)  # JSON is YAML; no rate limit
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hf_kvcache_plugin.app.cli", "serve", "--model", str(MODEL_PATH), "--config", f.name,
         "--max-new-tokens", str(args.max_tokens), "--health-port", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    while "[health]" not in Path(log.name).read_text():  # ready: the model is loaded
        if proc.poll() is not None:
            raise RuntimeError("the stdin server exited before serving: " + Path(log.name).read_text())
        time.sleep(0.1)
    proc.stdin.write(lines[0] + "\n")  # warm-up, as for the HTTP runs
    proc.stdin.flush()
    proc.stdout.readline()
    server = psutil.Process(proc.pid)
    cpu_start = sum(server.cpu_times()[:2])
    start = time.perf_counter()
    proc.stdin.write("".join(line + "\n" for line in lines))
    proc.stdin.close()
    latencies = []
    for _ in lines:
        if not proc.stdout.readline():
            break
        latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    cpu = sum(server.cpu_times()[:2]) - cpu_start  # before it exits: the stdin server's own CPU time
    proc.wait(60)
    os.unlink(f.name)
    os.unlink(log.name)
    return {
        "mode": "stdin (one by one)", "requests": len(lines), "answered": len(latencies),
        "lost": len(lines) - len(latencies), "answers_per_s": len(latencies) / wall,
        "latency_p50_s": _quantile(latencies, 0.5), "latency_p99_s": _quantile(latencies, 0.99), "wall_s": wall,
        "server_cpu_ms_per_answer": 1e3 * cpu / max(1, len(latencies)), "latencies_s": latencies,
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        lat = row["latencies_s"]
        left.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=row["mode"])
    left.set_xlabel("latency (s)")
    left.set_ylabel("fraction of answers")
    left.set_title("latency CDF")
    left.legend(fontsize=8)
    right.bar(range(len(rows)), [r["answers_per_s"] for r in rows])
    right.set_xticks(range(len(rows)), [r["mode"].replace(", ", "\n") for r in rows], fontsize=8)
    right.set_ylabel("answers / s")
    right.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-client", type=int, default=8)
    parser.add_argument("--noisy", type=int, default=48, help="requests the noisy client fires at once")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-sizes", default="1,8,16", help="max_batch_size of each HTTP run")
    parser.add_argument("--stdin-requests", type=int, default=64, help="requests of the stdin run (the first N)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sequential", action="store_true",
                        help="only the stdin run's requests over HTTP one at a time, next to the stdin run")
    parser.add_argument("--name")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.per_client, args.noisy, args.stdin_requests, args.batch_sizes = 8, 4, 24, 16, "1,8"
    args.name = args.name or ("http_load_sequential" if args.sequential else "http_load")
    rec = Recorder(args.name, {k: v for k, v in vars(args).items() if k != "quick"} | {"config": CONFIG})
    if args.sequential:
        rows = [sequential_run(args), stdin_run(args)]
    else:
        rows = [http_run(args, int(b)) for b in args.batch_sizes.split(",")] + [stdin_run(args)]
    for row in rows:
        rec.add(**row)
    columns = ["mode", "requests", "answered", "lost", "wrong", "during_fault", "answers_per_s", "ttft_p50_s",
               "ttft_p99_s", "latency_p50_s", "latency_p99_s", "noisy_429", "noisy_200", "normal_429",
               "breaker_opens", "sse_text_chunks_per_answer", "server_cpu_ms_per_answer",
               "client_cpu_ms_per_answer"]  # fmt: skip
    print(format_table(rows, columns))
    rec.write()
    plot(rows, rec.out_dir / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

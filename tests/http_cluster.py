"""A 3-rank ``hf-kvcache serve --http`` launch on localhost for tests/test_app_http_cluster.py.

    python tests/http_cluster.py OUT_DIR [--timeout SECONDS]

Forks the ranks around a loopback store as ``torchrun --nproc_per_node 3``
would (``coordinator_cluster.launch_ranks``). Rank 0 first answers every
request on a single-process server (no ``distributed:`` section: the
reference), then serves HTTP in front of the launch (``RoutedGeneration``) on
127.0.0.1:<free port> and sends, with the ``openai`` client, streamed greedy
requests whose prompts share a few 2-chunk beginnings:

- ``routed``: each beginning's requests one after another;
- ``after_kill``: rank 0 SIGKILLs rank 2 (once rank 2 has reported what it
  served) and sends every request again.

Ranks 1 and 2 run ``serve_worker`` and write their stats to
``OUT_DIR/rank<r>.json`` as they go; rank 0 writes its answers, routes and
stats to ``OUT_DIR/rank0.json`` and leaves, which ends rank 1's loop.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: forked ranks must not inherit an OpenMP pool

import json  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import openai  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coordinator_cluster import launch_ranks, launcher_args  # noqa: E402

from hf_kvcache_plugin.app.http_api import create_app  # noqa: E402
from hf_kvcache_plugin.app.http_cluster import RoutedGeneration, serve_worker  # noqa: E402
from hf_kvcache_plugin.app.http_serve import ApiServer  # noqa: E402
from hf_kvcache_plugin.app.models import load_model  # noqa: E402
from hf_kvcache_plugin.app.service import build_service  # noqa: E402
from hf_kvcache_plugin.config import parse_config  # noqa: E402
from hf_kvcache_plugin.embedded import embedded_model_path  # noqa: E402

WORLD = 3
MODEL = "stories260K"
NEW_TOKENS = 6
STORE = {"chunk_size": 16, "max_size_mb": 4.0}
CACHE = {"quant_type": "int8", "group_size": 8, "residual_length": 16}
DISTRIBUTED = {
    "namespace": "http", "replication_factor": 1, "heartbeat_interval_s": 0.1, "heartbeat_timeout_s": 1.0,
    "round_deadline_s": 20.0, "startup_timeout_s": 60.0, "breaker": {"fail_max": 2, "reset_timeout_s": 120.0},
}  # fmt: skip
# shared beginnings (2+ chunks of 16 tokens each) and the endings that follow them
BEGINNINGS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends "
    "and her big red ball. One day,",
    "Tom had a small dog called Max. Max liked to run and jump in the garden, and Tom liked to throw sticks for "
    "him every morning before school. Then",
    "There was a big tree near the river. Many birds lived in the tree, and they sang happy songs all day long "
    "when the sun was warm. But",
]
ENDINGS = [" she saw", " the dog"]


def prompts() -> list[str]:
    return [b + e for b in BEGINNINGS for e in ENDINGS]


def ask(url: str, prompt: str) -> str:
    """A streamed greedy completion's text."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def save(out_dir: Path, rank: int, report: dict) -> None:
    path = out_dir / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(report))
    path.with_suffix(".tmp").replace(path)


def load(out_dir: Path, rank: int) -> dict:
    try:
        return json.loads((out_dir / f"rank{rank}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def front(out_dir: Path, model, tokenizer) -> None:
    local = {"prefix_store": STORE, "cache": CACHE}
    with build_service(model, parse_config(local), http=False) as service:
        with ApiServer(create_app(service, model, tokenizer, MODEL, parse_config(local))) as server:
            reference = [ask(server.url, p) for p in prompts()]
    plugin = parse_config({**local, "distributed": DISTRIBUTED})
    report: dict = {"rank": 0, "reference": reference, "pids": {}}
    with build_service(model, plugin, http=False, generate_kwargs={"do_sample": False}) as service:
        routed = RoutedGeneration(service.coordinator, service.endpoint.generate).start()
        try:
            with ApiServer(create_app(service, model, tokenizer, MODEL, plugin, generate=routed)) as server:
                report["routed"] = [ask(server.url, p) for p in prompts()]
                report["routes"] = [list(r) for r in routed.routes]
                served_by_2 = sum(1 for server_rank, _, _ in routed.routes if server_rank == 2)
                deadline = time.monotonic() + 30
                while load(out_dir, 2).get("stats", {}).get("served_for_others", 0) < served_by_2:
                    if time.monotonic() > deadline:
                        raise TimeoutError("rank 2 did not report what it served")
                    time.sleep(0.05)
                os.kill(int(load(out_dir, 2)["pid"]), signal.SIGKILL)
                report["after_kill"] = [ask(server.url, p) for p in prompts()]
                report["routes_after_kill"] = [list(r) for r in routed.routes][len(report["routes"]):]
        finally:
            routed.stop()
        report["stats"] = {k: v for k, v in service.coordinator.stats().items() if k != "ring"}
        report["peers_alive"] = service.coordinator.peers_alive()
        report["hook"] = {k: service.hook.stats()[k] for k in ("hit_tokens", "prompt_tokens")}
    save(out_dir, 0, report)


def worker(rank: int, out_dir: Path, model) -> None:
    plugin = parse_config({"prefix_store": STORE, "cache": CACHE, "distributed": DISTRIBUTED})
    with build_service(model, plugin, http=False, generate_kwargs={"do_sample": False}) as service:
        done = threading.Event()
        thread = threading.Thread(target=lambda: (serve_worker(service.coordinator), done.set()), daemon=True)
        thread.start()
        while True:  # report as it goes: rank 2 is killed without notice
            stats = service.coordinator.stats()
            save(out_dir, rank, {"rank": rank, "pid": os.getpid(), "stats": {k: v for k, v in stats.items() if k != "ring"},
                                 "hook": {k: service.hook.stats()[k] for k in ("hit_tokens", "prompt_tokens")}})  # fmt: skip
            if done.wait(0.05):
                break
        thread.join()


def main() -> int:
    args = launcher_args(120.0)
    model, tokenizer = load_model(str(embedded_model_path()), "cpu")

    def run_rank(rank: int) -> None:
        if rank == 0:
            front(args.out_dir, model, tokenizer)
        else:
            worker(rank, args.out_dir, model)

    return launch_ranks(WORLD, run_rank, args.timeout, waited=[0, 1])


if __name__ == "__main__":
    sys.exit(main())

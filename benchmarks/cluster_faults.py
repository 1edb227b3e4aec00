"""Real processes on loopback, and the faults a rank can inject into them.

Shared by benchmarks/soak_cluster.py and the process tests
(tests/coordinator_cluster.py, tests/fault_cluster.py):

- ``launch_ranks``: what ``torchrun --nproc_per_node N`` does, minus the import
  cost paid N times: the caller imports everything and loads the model once,
  the ranks are forked (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
  TORCHELASTIC_USE_AGENT_STORE=True in their environment, a per-launch
  secret in ``HF_KVCACHE_CLUSTER_SECRET``) around a c10d store hosted here on
  loopback, as torchrun's agent does;
- prompts whose greedy tokens no legitimate reuse can change
  (``reference_tokens``): any difference from a single-process run is then a
  fault getting through;
- faults: entry batches a peer holding the secret could sign (``bad_batch``:
  NaN scales, one layer, scrambled codes), messages posted unsigned or altered
  after signing (``corrupt_posts``), an action run right after a rank posts a
  round's view, i.e. mid-round for the others (``after_view``: SIGKILL, a
  stalled main thread).
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Callable

import torch

from hf_kvcache_plugin import CacheConfig, PrefixStore, attach_prefix_cache
from hf_kvcache_plugin.distributed import PrefixStoreAdapter, generate_new_tokens
from hf_kvcache_plugin.distributed.payloads import encode_entries
from hf_kvcache_plugin.distributed.transport import host_c10d_store

__all__ = ["CACHE", "CHUNK", "GENERATE", "after_view", "bad_batch", "corrupt_posts", "launch_ranks", "reference_tokens"]

# the fault clusters' settings: chunks of 32 tokens, INT8, 4 greedy new tokens
CHUNK = 32
CACHE = CacheConfig(quant_type="int8", group_size=8, residual_length=32)
GENERATE = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
MARGIN = 0.1  # logits: smaller top-2 margins are near-ties that quantized reuse may flip legitimately


def launch_ranks(world: int, run_rank, timeout_s: float, waited: list[int]) -> int:
    """Fork ``world`` ranks (each calls ``run_rank(rank)``) around a loopback store, as torchrun would; wait for
    the ``waited`` ranks (at most ``timeout_s``), kill every rank still running. 0 when the waited ranks exited 0."""
    # a per-launch secret every rank signs its messages with, as a launcher would set it
    os.environ["HF_KVCACHE_CLUSTER_SECRET"] = secrets.token_hex(32)
    children = []
    for rank in range(world):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            port = int(os.read(read_end, 32))
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
            code = 0
            try:
                run_rank(rank)
            except BaseException:  # noqa: BLE001 - a rank reports any failure and exits non-zero
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(read_end)
        children.append((pid, write_end))
    # the store outlives every rank, as torchrun's agent store does
    store = host_c10d_store("127.0.0.1", 0, timeout_s=timeout_s)  # listening on loopback only
    for _, write_end in children:
        os.write(write_end, str(store.port).encode())
        os.close(write_end)
    deadline = time.monotonic() + timeout_s
    codes: dict[int, int] = {}
    pids = [children[r][0] for r in waited]
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid, _ in children:
        if pid not in codes:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass  # it ended by itself (a rank killed on purpose)
    failed = [pid for pid in pids if codes.get(pid) != 0]
    if failed:
        print(f"ranks with pids {failed} failed or timed out (exit codes {codes})", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------- prompts no legitimate reuse changes
def reference_tokens(model, prompt: list[int]) -> list[int] | None:
    """The plain single-process greedy tokens of ``prompt`` if no legitimate reuse can change them (every step's
    top-2 logit margin at least ``MARGIN``, and the same however its chunks were stored and hit), else None."""
    tokens, margin = _greedy_margin(model, prompt)
    return tokens if margin >= MARGIN and _same_under_reuse(model, prompt, tokens) else None


@torch.inference_mode()
def _greedy_margin(model, prompt: list[int]) -> tuple[list[int], float]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True, **GENERATE)
    margins = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt):].tolist(), min(margins)


def _same_under_reuse(model, prompt: list[int], expected: list[int]) -> bool:
    def run(store: PrefixStore, tokens: list[int]) -> list[int]:
        hook = attach_prefix_cache(model, store, CACHE)
        try:
            return generate_new_tokens(model, [tokens], 0, **GENERATE)[0]
        finally:
            hook.detach()

    chunk_first = PrefixStore(max_size_mb=64, chunk_size=CHUNK)
    run(chunk_first, prompt[:CHUNK + 1])  # the first chunk alone
    whole_first = PrefixStore(max_size_mb=64, chunk_size=CHUNK)
    outputs = [run(chunk_first, prompt), run(chunk_first, prompt), run(whole_first, prompt), run(whole_first, prompt)]
    return all(out == expected for out in outputs)


# ---------------------------------------------------------------------- faults
def bad_batch(store: PrefixStore, kinds: list[str]) -> bytes:
    """A batch of one entry per kind, each a first chunk this rank holds, damaged: ``nan_scales``, ``one_layer``
    (both refused by the importer's layout checks), ``scrambled`` (codes reversed in one layer's keys: well
    formed, only a recomputation can tell)."""
    roots = [info.key for info in store.entry_infos() if info.parent is None]
    payloads = PrefixStoreAdapter(store).export_entries([roots[i % len(roots)] for i in range(len(kinds))])
    for payload, kind in zip(payloads, kinds):
        if kind == "nan_scales":
            payload["keys"][0]["scale"] = payload["keys"][0]["scale"].clone().fill_(float("nan"))
        elif kind == "one_layer":
            payload["keys"], payload["values"] = payload["keys"][:1], payload["values"][:1]
        elif kind == "scrambled":
            layer = len(payload["keys"]) // 2
            payload["keys"][layer]["data"] = payload["keys"][layer]["data"].flip(-1).clone()
        else:
            raise ValueError(f"`kinds` holds {kind!r}; known are nan_scales, one_layer, scrambled")
    return encode_entries(payloads)


def corrupt_posts(coordinator, count: int | None = None, on_corrupt: Callable[[str], None] | None = None,
                  views_only: bool = False) -> None:
    """This rank's next ``count`` posts (None: every one from now on; ``views_only``: of its round views) go out
    unsigned or altered after signing, in turn; ``on_corrupt(kind)`` is told each time."""
    transport = coordinator.transport
    original = transport.post
    done = [0]

    def post(key: str, payload: bytes) -> None:
        if (count is not None and done[0] >= count) or (views_only and "/view/" not in key):
            original(key, payload)
            return
        done[0] += 1
        if done[0] % 2:
            transport.c10d_store.set(key, payload)
            kind = "unsigned"
        else:
            sealed = bytearray(transport.signer.seal(key, payload))
            sealed[-1] ^= 0x01  # one bit flipped after signing
            transport.c10d_store.set(key, bytes(sealed))
            kind = "bit_flipped"
        if on_corrupt is not None:
            on_corrupt(kind)

    transport.post = post


def after_view(coordinator, action: Callable[[int], None]) -> None:
    """Run ``action(round_no)`` right after this rank posts each round's view (mid-round for the others)."""
    messages = coordinator.messages
    original = messages.post

    def post(number: int, key: str, payload: bytes) -> None:
        original(number, key, payload)
        if "/view/" in key:
            action(number)

    messages.post = post

"""``InstanceCluster``: several vLLM instances on one host share their tiers through our ``CacheCoordinator``.

What of the coordinator applies to vLLM: its ring, directories, migration
and global eviction, over its signed c10d-store messages. Each instance's
worker runs a coordinator over its ``PrefixStore`` (``PrefixStoreAdapter``,
entries checked against the model's layout before they are stored) and steps
rounds without prompts from a daemon thread, one per heartbeat interval.
Migration sends each stored chain to the ``replication_factor`` instances the
ring names as its owners, so a prefix one instance computed becomes a hit of
the others (every instance, with ``replication_factor >= instances``); an
instance that stops is found dead by its heartbeat and the others go on.

What does not apply: the coordinator's request routing. Its rounds route the
prompts that every process hands in together (a data-parallel ``generate``
loop), while each vLLM instance schedules the requests it receives itself;
sending a request to the instance holding its prefix is the job of whatever
balances requests in front of the instances.

Instance 0 hosts the c10d store on ``distributed.bind_address:store_port``
(loopback by default); the others connect to it, retrying until
``startup_timeout_s`` (instances start in any order).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from ..config import DistributedConfig
from ..distributed.coordinator import CacheCoordinator
from ..distributed.nodes import NodeInfo
from ..distributed.prefix_adapter import PrefixStoreAdapter
from ..distributed.signing import launch_secret
from ..distributed.transport import StoreTransport, host_c10d_store
from ..reuse.prefix_store import PrefixEntry, PrefixStore

__all__ = ["InstanceCluster"]

logger = logging.getLogger(__name__)

_CONNECT_RETRY_S = 0.5


class InstanceCluster:
    """Instance ``rank`` of ``instances`` sharing ``store``; see the module docstring.

    ``checks``: what a peer's entry has to pass before it is stored (the model's ``EntryLayout.problem``).
    """

    def __init__(
        self,
        store: PrefixStore,
        config: DistributedConfig,
        rank: int,
        instances: int,
        checks: Sequence[Callable[[PrefixEntry], str | None]] = (),
    ):
        if not 0 <= rank < instances:
            raise ValueError(f"`rank` has to be in [0, {instances}) but got {rank}")
        if config.store_port is None:
            raise ValueError("`distributed.store_port` has to be set: instance 0 hosts the coordinator's store there")
        self.store = store
        self.config = config
        self.rank = rank
        self.instances = instances
        self.adapter = PrefixStoreAdapter(store, checks=tuple(checks))
        # before any traffic: no secret (off loopback), no cluster
        self.secret = launch_secret(config.secret_env, config.bind_address)
        self.coordinator: CacheCoordinator | None = None
        self.error: str | None = None  # why the cluster stopped, if it did
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "InstanceCluster":
        """Connect, announce and run rounds on a daemon thread (returns at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"hf-kvcache-cluster-{self.rank}", daemon=True)
            self._thread.start()
        return self

    def _connect(self) -> dist.Store:
        cfg = self.config
        timeout = datetime.timedelta(seconds=cfg.heartbeat_timeout_s)
        if self.rank == 0:
            return host_c10d_store(cfg.bind_address, cfg.store_port, self.instances, cfg.heartbeat_timeout_s)
        deadline = time.monotonic() + cfg.startup_timeout_s
        while True:
            try:
                return dist.TCPStore(cfg.bind_address, cfg.store_port, is_master=False, timeout=timeout)
            except (dist.DistError, RuntimeError, TimeoutError):
                if self._stop.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(_CONNECT_RETRY_S)

    def _coordinator(self, c10d_store: dist.Store) -> CacheCoordinator:
        cfg = self.config
        transport = StoreTransport(
            c10d_store, self.rank, self.instances,
            namespace=cfg.namespace, heartbeat_interval_s=cfg.heartbeat_interval_s,
            heartbeat_timeout_s=cfg.heartbeat_timeout_s, breaker=cfg.breaker_config(), secret=self.secret,
            max_payload_bytes=int(cfg.max_payload_mb * 2**20), progress_timeout_s=cfg.round_deadline_s,
        )  # fmt: skip
        capacity = cfg.capacity_mb or self.store.max_size_mb or 1.0
        node = NodeInfo(self.rank, f"{socket.gethostname()}:{os.getpid()}", capacity)
        return CacheCoordinator(node, cfg, local_entries=self.adapter, transport=transport)

    def _run(self) -> None:
        try:
            self.coordinator = self._coordinator(self._connect())
            self.coordinator.start()  # waits (at most startup_timeout_s) for the other instances
        except Exception as exc:  # noqa: BLE001 - the instance serves on alone; stats() says why
            self.error = f"{type(exc).__name__}: {exc}"
            logger.exception("vLLM instance %d could not join its cluster; its tier stays its own", self.rank)
            return
        while not self._stop.wait(self.config.heartbeat_interval_s):
            try:
                self.coordinator.step()
            except Exception:  # a failed round must not end the thread; the next one retries
                logger.exception("vLLM instance %d: a cluster round failed", self.rank)
                self.coordinator.counters["failed_rounds"] += 1

    def stats(self) -> dict[str, Any]:
        """The coordinator's figures (rounds, migrations, breakers), or how far it got."""
        if self.coordinator is None:
            return {"state": "failed" if self.error else "connecting", "error": self.error, "rank": self.rank}
        return {**self.coordinator.stats(), "error": self.error, "rank": self.rank}

    def close(self) -> None:
        """Leave: peers stop waiting for this instance at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.round_deadline_s + 5)
            self._thread = None
        if self.coordinator is not None:
            self.coordinator.close()

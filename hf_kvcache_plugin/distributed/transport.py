"""Messages between processes through the c10d ``TCPStore``, each receive bounded in time.

Why not gloo collectives: a collective needs every rank. With one rank stopped,
``all_gather_object`` on gloo blocks every other rank until the process-group
timeout, and after that timeout gloo closes the pair ("Application timeout
caused pair closure"): every later collective on the group fails at once, even
if the peer comes back. A group cannot drop a member either. So a dead peer
would stall every rank and then end coordination for good.

What this module does instead: a message is a key in the c10d store that
``torchrun`` (and ``accelerate launch``, which runs torchrun) already hosts in
its agent process, outside every worker, so it outlives any worker. Sending is
a ``set``; receiving polls ``check`` until the key is there, and gives up when

- the peer's heartbeat counter (bumped by a thread every ``heartbeat_interval_s``)
  has not moved for ``heartbeat_timeout_s``: the peer is dead or stopped;
- the peer declared itself OFFLINE: it left;
- the peer is two rounds behind, or past the message's round without having
  posted it: out of step (it will resynchronise; nothing to wait for);
- the call's deadline passes: the peer is alive but too slow.

The heartbeat thread beats only while this process's main thread makes
progress (``mark_progress``: each round, each poll of a wait): a process whose
main thread is stuck stops beating after ``progress_timeout_s`` and is then
found dead, instead of looking alive while nothing answers.

So a live process learns within ``heartbeat_timeout_s`` that a peer died,
without hanging. Every receive from a peer goes through that peer's
``pybreaker.CircuitBreaker``: deaths and deadlines count as failures, leaving
and being out of step do not (nor do ``ValueError``s: bad input). An open
breaker refuses at once (the caller serves locally) until ``reset_timeout``
lets one trial through. Writes to the store go through one more breaker, for
the store itself. The breakers are the serving layer's (``create_breaker``
with a ``BreakerConfig``, timed on the injectable clock): their state changes
are logged and, given a ``ServingMetrics``, counted there like the store's.

Every value written is sealed and every value read is opened by a
``MessageSigner`` (``signing``): unsigned, wrongly signed, misattributed or
stale values, and values over ``max_payload_bytes``, are deleted from the
store, counted (``dropped_<reason>``, and ``hf_kvcache_cluster_messages_dropped``
in the metrics) and treated as absent; one met while waiting for a peer's
message ends the wait as a failure of that peer (``BadMessage``), and so
does a signed message of the peer that turns out malformed (``reject``).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

import pybreaker
import torch.distributed as dist

from ..config import BreakerConfig, DistributedConfig
from ..errors import KVCacheError
from ..resilience.breakers import create_breaker
from ..resilience.metrics import ServingMetrics
from .signing import BadMessage, MessageSigner, launch_secret

__all__ = [
    "BadMessage",
    "BreakerEvents",
    "PeerDead",
    "PeerLeft",
    "PeerOutOfStep",
    "PeerTimeout",
    "PeerUnavailable",
    "StoreTransport",
    "connect_c10d_store",
    "host_c10d_store",
]

logger = logging.getLogger(__name__)

_POLL_S = 0.002  # between `check`s of a message key: a round trip to the store on loopback is ~0.1 ms
_LIVENESS_POLL_S = 0.05  # between reads of a peer's heartbeat, round and state


class PeerUnavailable(KVCacheError, RuntimeError):
    """A message from a peer did not come."""

    code = "peer_unavailable"
    detail_fields = ("peer",)

    def __init__(self, peer: int, what: str):
        super().__init__(f"peer {peer}: {what}")
        self.peer = peer


class PeerDead(PeerUnavailable):
    """No heartbeat for longer than the heartbeat timeout (crashed, killed, stopped)."""

    code = "peer_dead"


class PeerTimeout(PeerUnavailable):
    """Alive, but the message did not come before the call's deadline."""

    code = "peer_timeout"


class PeerLeft(PeerUnavailable):
    """The peer declared itself OFFLINE; not a failure."""


class PeerOutOfStep(PeerUnavailable):
    """The peer is in another round, so the message will not come; not a failure."""


def host_c10d_store(host: str, port: int, world_size: int | None = None, timeout_s: float = 30.0) -> dist.TCPStore:
    """A c10d store server listening on ``host`` only (a ``TCPStore`` made by itself listens on every interface).

    ``port`` 0 picks a free one (``store.port``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)
    port = listener.getsockname()[1]
    # the server takes the descriptor over: detached, the Python socket object will not close it
    return dist.TCPStore(
        host, port, world_size, is_master=True, wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=listener.detach(),
    )  # fmt: skip


def connect_c10d_store(
    rank: int, world_size: int, store_port: int | None = None, timeout_s: float = 30.0,
    bind_address: str = DistributedConfig.bind_address,
) -> dist.Store:
    """A client of the rendezvous store of this launch.

    Under ``torchrun`` / ``accelerate launch`` (``TORCHELASTIC_USE_AGENT_STORE=True``)
    that is the agent's store at ``MASTER_ADDR:MASTER_PORT``, which outlives any
    worker. Otherwise rank 0 hosts a store on ``bind_address:store_port``
    (loopback by default: only this machine reaches it); it then lives and
    dies with rank 0 (if rank 0 dies, every breaker opens and every rank serves
    locally).
    """
    host = os.environ.get("MASTER_ADDR", bind_address)
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(host, int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    if store_port is None:
        raise ValueError(
            "not launched by torchrun / accelerate launch (no agent store); set `distributed.store_port` to a free "
            "port for rank 0 to host the coordinator's store, or launch with torchrun"
        )
    if rank == 0:
        return host_c10d_store(bind_address, store_port, world_size, timeout_s)  # also rank 0's client
    return dist.TCPStore(host, store_port, is_master=False, timeout=timeout)


class BreakerEvents(pybreaker.CircuitBreakerListener):
    """Counts every state change of the breakers it listens to, for ``stats()`` and ``may_call`` (the serving
    layer's ``BreakerMetricsListener`` logs them and feeds the metrics)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.transitions: Counter[tuple[str, str]] = Counter()  # (breaker name, new state) -> count
        self.failures: Counter[str] = Counter()
        self.opened_at: dict[str, float] = {}  # breaker name -> when it last opened

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state, new_state) -> None:
        old = old_state.name if old_state is not None else "none"
        if old == new_state.name:
            return  # pybreaker re-announces a state it finds already set; not a change
        self.transitions[(cb.name, new_state.name)] += 1
        if new_state.name == pybreaker.STATE_OPEN:
            self.opened_at[cb.name] = self.clock()

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.failures[cb.name] += 1


class StoreTransport:
    """Keyed messages between ranks over a c10d store; see the module docstring.

    Args:
        c10d_store: a client of the launch's c10d store that every rank reaches (``connect_c10d_store``).
        namespace: prefix of every key, so two coordinators can share a store.
        breaker: thresholds of every breaker (``DistributedConfig.breaker_config()``).
        metrics: where breaker states, opens and recoveries, and dropped messages are counted; None for nowhere.
        clock: monotonic seconds, also the breakers' clock (injectable: tests need no sleeps).
        secret: the launch's secret (``signing.launch_secret``); None: ``$HF_KVCACHE_CLUSTER_SECRET`` or, as
            on loopback, the fixed stand-in.
        max_payload_bytes: the largest value written or accepted.
        progress_timeout_s: the heartbeat stops when the main thread made no progress for this long.
    """

    def __init__(
        self,
        c10d_store: dist.Store,
        rank: int,
        world_size: int,
        *,
        namespace: str = DistributedConfig.namespace,
        heartbeat_interval_s: float = DistributedConfig.heartbeat_interval_s,
        heartbeat_timeout_s: float = DistributedConfig.heartbeat_timeout_s,
        breaker: BreakerConfig | None = None,
        metrics: ServingMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        secret: bytes | None = None,
        max_payload_bytes: int = int(DistributedConfig.max_payload_mb * 2**20),
        progress_timeout_s: float = DistributedConfig.round_deadline_s,
    ):
        self.c10d_store = c10d_store
        self.rank = rank
        self.world_size = world_size
        self.namespace = namespace
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self.events = BreakerEvents(clock)
        breaker = breaker or DistributedConfig().breaker_config()
        # a breaker per peer, and one for the store that every write goes through; a peer that left or is in
        # another round did not fail
        self.breakers = {
            peer: create_breaker(
                f"rank{rank}->peer{peer}", breaker, metrics=metrics, clock=clock,
                exclude=(ValueError, PeerLeft, PeerOutOfStep), listeners=[self.events],
            )  # fmt: skip
            for peer in range(world_size)
            if peer != rank
        }
        self.c10d_store_breaker = create_breaker(
            f"rank{rank}->store", breaker, metrics=metrics, clock=clock, listeners=[self.events]
        )
        self.counters: Counter[str] = Counter()
        if secret is None:
            secret = launch_secret(DistributedConfig.secret_env, "127.0.0.1")
        self.signer = MessageSigner(secret, rank)
        self.max_payload_bytes = max_payload_bytes
        self.progress_timeout_s = progress_timeout_s
        self._progress_at = clock()
        self._dropped = None
        if metrics is not None:
            self._dropped = metrics.counter(
                "hf_kvcache_cluster_messages_dropped",
                "Cluster messages refused (unsigned, bad signature, wrong sender, stale, oversized, malformed)",
                ["rank", "peer", "reason"],
            )
        self._beats: dict[int, tuple[int, float]] = {}  # peer -> (last counter seen, when it last moved)
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ keys
    def key(self, *parts: object) -> str:
        return "/".join([self.namespace, *map(str, parts)])

    # ------------------------------------------------------------------ liveness
    def mark_progress(self) -> None:
        """The main thread is moving: keep the heartbeat going (see the module docstring)."""
        self._progress_at = self.clock()

    def _making_progress(self) -> bool:
        return self.clock() - self._progress_at <= self.progress_timeout_s

    def start_heartbeat(self) -> None:
        """Bump this rank's heartbeat counter from a thread, on its own store connection, while the main thread
        makes progress."""
        if self._heartbeat_thread is not None:
            return
        self._stop.clear()
        connection = self.c10d_store.clone()
        key = self.key("heartbeat", self.rank)
        self.mark_progress()
        connection.add(key, 1)

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_interval_s):
                if not self._making_progress():
                    self.counters["heartbeats_withheld"] += 1  # the main thread is stuck: look dead
                    continue
                try:
                    connection.add(key, 1)
                except dist.DistError as exc:  # the store went away: peers will see us as dead
                    logger.warning("rank %d: heartbeat failed: %s", self.rank, exc)
                    self.counters["heartbeat_failures"] += 1

        self._heartbeat_thread = threading.Thread(target=beat, name=f"hf_kvcache-heartbeat-{self.rank}", daemon=True)
        self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=2 * self.heartbeat_interval_s + 1)
            self._heartbeat_thread = None

    def _heartbeat_of(self, peer: int) -> tuple[int, float]:
        """``peer``'s heartbeat counter and the seconds since it last moved (0 the first time it is read)."""
        value = self.c10d_store.add(self.key("heartbeat", peer), 0)
        now = self.clock()
        last = self._beats.get(peer)
        if last is None or last[0] != value:
            self._beats[peer] = (value, now)
            return value, 0.0
        return value, now - last[1]

    def may_call(self, peer: int) -> bool:
        """Whether ``peer``'s breaker lets a call through: closed, half-open, or open for longer than its reset
        timeout (the next call is the trial)."""
        breaker = self.breakers[peer]
        if breaker.current_state != pybreaker.STATE_OPEN:
            return True
        opened = self.events.opened_at.get(breaker.name)
        return opened is None or self.clock() - opened >= breaker.reset_timeout

    def breaker_state(self, peer: int) -> str:
        return self.breakers[peer].current_state

    # ------------------------------------------------------------------ messages
    def post(self, key: str, payload: bytes) -> None:
        """Write one message, signed (through the store's breaker). A payload over ``max_payload_bytes`` is a
        ``ValueError``: the caller sends less."""
        if len(payload) > self.max_payload_bytes:
            raise ValueError(f"a message of {len(payload)} bytes exceeds `max_payload_mb` ({self.max_payload_bytes} "
                             f"bytes): {key!r} not sent")
        self.c10d_store_breaker.call(self.c10d_store.set, key, self.signer.seal(key, payload))
        self.counters["bytes_posted"] += len(payload)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.c10d_store_breaker.call(self.c10d_store.delete_key, key)

    def read(self, key: str, sender: int | None = None) -> bytes | None:
        """A key's verified value if present, else None (a refused one is dropped); no waiting (through the
        store's breaker). ``sender``: the rank that posts ``key``."""
        data = self.c10d_store_breaker.call(self._take, key, False)
        return None if data is None else self._open(key, data, sender)

    def read_or_none(self, key: str, sender: int | None = None) -> bytes | None:
        """``read``, with a failing store logged, counted and answered as "not there"."""
        try:
            return self.read(key, sender)
        except (dist.DistError, pybreaker.CircuitBreakerError) as exc:
            self.counters["store_read_failures"] += 1
            logger.warning("rank %d: store read of %s failed: %s", self.rank, key, exc)
            return None

    def _open(self, key: str, data: bytes, sender: int | None, reraise: bool = False) -> bytes | None:
        """The body of a value read under ``key``, or None when it is refused (deleted and counted; with
        ``reraise`` the ``BadMessage`` is raised after that)."""
        try:
            if len(data) > self.max_payload_bytes + 64:
                raise BadMessage("oversized", f"{key!r} holds {len(data)} bytes, over `max_payload_mb`")
            body = self.signer.open(key, data, sender)
        except BadMessage as exc:
            self._drop(key, sender, exc)
            try:
                self.c10d_store.delete_key(key)  # nobody may act on it, and a waiting reader waits for the real one
            except dist.DistError:
                pass
            if reraise:
                raise
            return None
        self.counters["bytes_received"] += len(body)
        return body

    def _drop(self, key: str, sender: int | None, exc: BadMessage) -> None:
        self.counters[f"dropped_{exc.reason}"] += 1
        if self._dropped is not None:
            self._dropped.labels(str(self.rank), str(sender), exc.reason).inc()
        logger.warning("rank %d: dropped a message: %s", self.rank, exc)

    def reject(self, peer: int, key: str, problem: str, reason: str = "malformed") -> None:
        """``peer`` sent a signed message under ``key`` that cannot be used (``malformed``; ``verification``:
        entries that are not the K/V of their tokens): dropped, counted under ``reason``, and a failure on
        ``peer``'s breaker (it is the peer's own doing)."""
        exc = BadMessage(reason, f"{key!r} from rank {peer}: {problem}")
        self._drop(key, peer, exc)

        def fail() -> None:
            raise exc

        try:
            self.breakers[peer].call(fail)
        except (BadMessage, pybreaker.CircuitBreakerError):
            pass

    def exists(self, key: str) -> bool:
        return self.c10d_store_breaker.call(self.c10d_store.check, [key])

    def add(self, key: str, amount: int) -> int:
        """Add to a counter key and return its value (``amount=0`` reads it), through the store's breaker."""
        return int(self.c10d_store_breaker.call(self.c10d_store.add, key, amount))

    def _take(self, key: str, delete: bool) -> bytes | None:
        """The message if it is there; None if not (or if it vanished between ``check`` and ``get``)."""
        if not self.c10d_store.check([key]):
            return None
        try:
            payload = self.c10d_store.get(key)
        except dist.DistStoreError:
            # its poster deleted it after our check: a `get` of a missing key waits for the store's op timeout
            return None
        if delete:
            self.c10d_store.delete_key(key)
        return payload

    def receive(
        self,
        peer: int,
        key: str,
        timeout_s: float,
        *,
        round_no: int | None = None,
        peer_round: Callable[[int], int] | None = None,
        peer_left: Callable[[int], bool] | None = None,
        delete: bool = True,
    ) -> bytes:
        """Wait for ``key`` from ``peer`` through its breaker; raises a ``PeerUnavailable``
        or ``pybreaker.CircuitBreakerError`` (breaker open) instead of hanging."""
        return self.breakers[peer].call(self._wait, peer, key, timeout_s, round_no, peer_round, peer_left, delete)

    def _wait(
        self,
        peer: int,
        key: str,
        timeout_s: float,
        round_no: int | None,
        peer_round: Callable[[int], int] | None,
        peer_left: Callable[[int], bool] | None,
        delete: bool,
    ) -> bytes:
        deadline = self.clock() + timeout_s
        next_liveness = self.clock()
        beat_at_start: int | None = None
        while True:
            self.mark_progress()  # waiting for peers is this process doing its work
            data = self._take(key, delete)
            if data is not None:
                # a refused value under the key this peer posts ends the wait as a failure of that peer
                return self._open(key, data, peer, reraise=True)
            now = self.clock()
            if now >= next_liveness:
                next_liveness = now + _LIVENESS_POLL_S
                if peer_left is not None and peer_left(peer):
                    raise PeerLeft(peer, "left the cluster")
                beat, silent = self._heartbeat_of(peer)
                if silent > self.heartbeat_timeout_s:
                    self.counters["dead_peer_detections"] += 1
                    raise PeerDead(peer, f"no heartbeat for {silent:.1f} s")
                beat_at_start = beat if beat_at_start is None else beat_at_start
                if round_no is not None and peer_round is not None:
                    theirs = peer_round(peer)
                    out_of_step = theirs > round_no or theirs < round_no - 1
                    # "out of step" needs proof of life (a beat during this wait): a stopped peer also looks
                    # behind, and must be found dead, not skipped
                    if out_of_step and beat != beat_at_start and not self.c10d_store.check([key]):
                        raise PeerOutOfStep(peer, f"is in round {theirs}, this message is for round {round_no}")
            if now >= deadline:
                self.counters["timeouts"] += 1
                raise PeerTimeout(peer, f"no message {key!r} within {timeout_s:.1f} s")
            time.sleep(_POLL_S)

"""Signed messages: every value a process writes to the c10d store carries an HMAC-SHA256 over a launch secret.

Anyone who reaches the store's port can write keys; without a signature a
stray or hostile client could post eviction orders, views, OFFLINE records or
entries with scrambled codes. A sealed message is

    b"HKV1" | sender rank (u32) | sequence number (u64) | HMAC (32 bytes) | body

where the HMAC covers the magic, the store key the message is written under,
the sender, the sequence number and the body. So a message

- without the magic or with a wrong HMAC (unsigned, corrupted, made without
  the secret) is refused;
- copied to another key (another round, another target) is refused: the key
  is signed;
- claiming another sender than the peer it is read from is refused;
- older than one already read under the same key from the same sender (a
  replayed directory or node record) is refused as stale. Sequence numbers
  start from the wall clock in nanoseconds when the process starts, so a
  restarted process keeps moving forward.

The secret comes from the environment (``DistributedConfig.secret_env``, set
by whoever launches the processes). On loopback a missing secret is replaced
by a fixed one (and a warning): messages are still checked for corruption and
senders, but any local user could forge them. Elsewhere it is an error.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import OrderedDict

__all__ = ["BadMessage", "MessageSigner", "is_loopback", "launch_secret"]

logger = logging.getLogger(__name__)

MAGIC = b"HKV1"
_HEADER = struct.Struct(">4sIQ32s")  # magic, sender, sequence, mac
_LOOPBACK_SECRET = b"hf_kvcache_plugin/loopback-only"  # no protection against local users: a warning says so
_REMEMBERED_KEYS = 65536  # latest sequence number per (sender, key), the oldest forgotten first


class BadMessage(Exception):
    """A message that must not be acted on. ``reason`` is one of ``unsigned``, ``bad_signature``,
    ``wrong_sender``, ``stale``, ``oversized``, ``malformed``, ``verification`` (it names the counter it is
    counted under).

    Not a ``ValueError``: the transport's breakers exclude ``ValueError`` (bad input of this process), and a
    peer that sends bad messages has to count against its breaker."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to loopback addresses only."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def launch_secret(env_name: str, host: str) -> bytes:
    """The launch's secret from ``$env_name``; on a loopback ``host`` a fixed stand-in when it is unset."""
    value = os.environ.get(env_name, "")
    if value:
        return value.encode()
    if not is_loopback(host):
        raise ValueError(
            f"cluster traffic through {host!r} is not on loopback, so it has to be signed: set ${env_name} to the "
            f"same secret in every process of the launch (e.g. `export {env_name}=$(openssl rand -hex 32)` before "
            "torchrun)"
        )
    logger.warning(
        "$%s is not set: cluster messages on loopback are signed with a fixed key (corruption and wrong senders "
        "are caught, but any local user could forge messages); set it for a per-launch secret", env_name
    )
    return _LOOPBACK_SECRET


class MessageSigner:
    """Seals this process's messages and opens its peers'; see the module docstring."""

    def __init__(self, secret: bytes, sender: int):
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("the cluster secret has to be non-empty bytes")
        self._key = hashlib.sha256(secret).digest()
        self.sender = sender
        self._sequence = time.time_ns()
        self._latest: OrderedDict[tuple[int, str], int] = OrderedDict()

    def _mac(self, key: str, sender: int, sequence: int, body: bytes) -> bytes:
        header = MAGIC + struct.pack(">IQ", sender, sequence) + key.encode() + b"\0"
        return hmac.new(self._key, header + body, hashlib.sha256).digest()

    def seal(self, key: str, body: bytes) -> bytes:
        self._sequence += 1
        mac = self._mac(key, self.sender, self._sequence, body)
        return _HEADER.pack(MAGIC, self.sender, self._sequence, mac) + body

    def open(self, key: str, data: bytes, sender: int | None = None) -> bytes:
        """The body of a message read under ``key`` (from ``sender`` when given); raises ``BadMessage``."""
        if len(data) < _HEADER.size or not data.startswith(MAGIC):
            raise BadMessage("unsigned", f"{key!r} holds {len(data)} bytes without a signature header")
        _, claimed, sequence, mac = _HEADER.unpack_from(data)
        body = data[_HEADER.size:]
        if not hmac.compare_digest(mac, self._mac(key, claimed, sequence, body)):
            raise BadMessage("bad_signature", f"{key!r}: the signature does not match (corrupted, or not made with "
                             "this launch's secret)")
        if sender is not None and claimed != sender:
            raise BadMessage("wrong_sender", f"{key!r} is signed by rank {claimed}, not by rank {sender}")
        latest = self._latest.get((claimed, key))
        if latest is not None and sequence < latest:
            raise BadMessage("stale", f"{key!r}: message {sequence} of rank {claimed} is older than {latest}, "
                             "already read (a replay)")
        self._latest[(claimed, key)] = sequence
        self._latest.move_to_end((claimed, key))
        while len(self._latest) > _REMEMBERED_KEYS:
            self._latest.popitem(last=False)
        return body

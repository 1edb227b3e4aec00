"""One root for the errors this package raises on purpose, each with a machine-readable record.

``except KVCacheError`` catches any of them; ``exc.to_dict()`` gives
``{"error": code, "type": class name, "message": str(exc), "details": {...}}``
for logs, metrics and HTTP responses, where ``details`` holds the exception's
own fields (the budget and bytes of a refusal, a config's problems, the peer
that did not answer, when to retry). Every subclass keeps the built-in base it
always had (``ValueError`` for bad input, ``RuntimeError`` for a state that
refuses), so existing ``except ValueError`` / ``except RuntimeError`` code
still catches what it did.

=========================  =====================  ============================
class                      code                   also a
=========================  =====================  ============================
``ConfigError``            ``config_invalid``     ``ValueError``
``SnapshotError``          ``snapshot_invalid``   ``ValueError``
``CacheBudgetExceeded``    ``cache_budget_...``   ``RuntimeError``
``RateLimitExceeded``      ``rate_limited``       ``RuntimeError``
``PeerUnavailable``        ``peer_unavailable``   ``RuntimeError`` (``PeerDead``, ``PeerTimeout``)
=========================  =====================  ============================
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVCacheError"]


class KVCacheError(Exception):
    """Base of this package's own errors; ``code`` names the kind, ``details()`` its fields."""

    code = "kvcache_error"
    # attribute names copied into ``details()`` when the instance has them
    detail_fields: tuple[str, ...] = ()

    def details(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.detail_fields if hasattr(self, name)}

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "type": type(self).__name__, "message": str(self), "details": self.details()}

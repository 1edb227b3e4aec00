"""Moved in 0.2: the hardening pieces to ``hf_kvcache_plugin.resilience``, ``build_service`` to ``hf_kvcache_plugin.app``."""

from .app.service import ServingService, build_service  # noqa: F401
from .resilience import *  # noqa: F401,F403

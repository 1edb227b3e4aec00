"""The top layer: the ``hf-kvcache`` commands and ``build_service``, the only place that wires every layer together.

``cli`` (the ``hf-kvcache`` parser and ``generate``), ``serve`` (``hf-kvcache
serve``), ``service`` (``build_service``: cache, prefix reuse, resilience and
the coordinator from one ``PluginConfig``), ``models`` (which model a command runs).
"""

from .service import ServingService, build_service

__all__ = ["ServingService", "build_service"]

"""vLLM plugin entry point (``vllm.general_plugins`` in setup.cfg): registers our connector's name.

With it, ``--kv-transfer-config '{"kv_connector": "HFKVCacheConnector", "kv_role": "kv_both"}'``
works without ``kv_connector_module_path``. vLLM calls ``register`` in every process it starts.
"""

from __future__ import annotations

CONNECTOR_NAME = "HFKVCacheConnector"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # vLLM refuses a second registration of a name; a process may load plugins more than once
    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            CONNECTOR_NAME, "hf_kvcache_plugin.integrations.vllm_connector", "HFKVCacheConnector"
        )

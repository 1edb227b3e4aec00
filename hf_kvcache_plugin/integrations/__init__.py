"""Integrations with serving engines other than ``transformers``' ``generate``.

``vllm_connector``: the prefix store as a KV connector tier behind ``vllm serve``
(needs ``vllm``; nothing here imports it until that module is imported).
"""

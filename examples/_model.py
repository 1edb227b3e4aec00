"""Where the examples find a model: --model (or the YAML's `model:`), else the stories260K shipped with the package."""

from __future__ import annotations

import argparse

from hf_kvcache_plugin.embedded import STORIES260K as DEFAULT_MODEL

MODEL_HELP = "Hugging Face id or local path (default: the YAML's `model:`, then the embedded stories260K)"


def model_argument(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="Hugging Face id or local path (default: the embedded stories260K)")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    return parser.parse_args()

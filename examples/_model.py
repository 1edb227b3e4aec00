"""Where the examples find a model: --model, else ../shared/models/stories260K beside the checkout."""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def model_argument(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=str(SHARED_MODEL) if SHARED_MODEL.is_dir() else None,
                        help="Hugging Face id or local path (default: the shared stories260K model when present)")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    args = parser.parse_args()
    if args.model is None:
        parser.error("pass --model with a Hugging Face model id or a local path")
    return args

"""The tiny real model shipped inside the package: the default wherever no model is given.

``STORIES260K`` is a folder that ``from_pretrained`` loads offline (Karpathy's
stories260K, MIT; origin and licence in that folder). It is package data
(``setup.cfg``), so every install carries it and nothing has to be downloaded
for the commands, examples and tests to run.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STORIES260K", "embedded_model_path"]

STORIES260K = Path(__file__).resolve().parent / "stories260K"

# what from_pretrained needs for model and tokenizer; a copy missing one was packaged without its data
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def embedded_model_path() -> Path:
    """``STORIES260K``, after checking that its files were installed (a ``FileNotFoundError`` names the missing)."""
    missing = [name for name in _REQUIRED_FILES if not (STORIES260K / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded model at {STORIES260K} lacks {', '.join(missing)}: this copy of hf_kvcache_plugin was "
            "installed without its package data; reinstall it, or pass `--model`"
        )
    return STORIES260K

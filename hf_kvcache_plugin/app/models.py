"""Which model the commands run, and loading it: ``--model`` > the config's ``model:`` > the shared tiny model."""

from __future__ import annotations

from pathlib import Path

from ..config import PluginConfig

__all__ = ["format_bytes", "load_model", "resolve_model"]

_SHARED_MODEL = Path("shared") / "models" / "stories260K"


def _default_model_candidates() -> list[Path]:
    """``../shared/models/stories260K`` beside the working directory or beside this checkout."""
    checkout = Path(__file__).resolve().parents[1]
    return [Path.cwd().parent / _SHARED_MODEL, checkout.parent / _SHARED_MODEL]


def resolve_model(cli_model: str | None, config: PluginConfig) -> str:
    """``--model`` > the config's ``model:`` > ``../shared/models/stories260K`` when it exists."""
    if cli_model:
        return cli_model
    if config.model:
        return config.model
    for candidate in _default_model_candidates():
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise ValueError(
        "no model given: pass `--model` with a Hugging Face model id (e.g. `--model HuggingFaceTB/SmolLM2-135M`) "
        "or a local directory holding config.json and weights, or set `model:` in the YAML config"
    )


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def load_model(name: str, device: str):
    """(model in eval mode on ``device``, tokenizer); an unloadable name is a ``ValueError`` saying what to pass."""
    # imported here: transformers' auto classes are slow to import and only a command needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load model {name!r}: {exc}\nPass `--model` with a Hugging Face id or a local path "
            "to a directory with config.json, weights and tokenizer files."
        ) from None
    return model, tokenizer

"""Which model the commands run, and loading it: ``--model`` > the config's ``model:`` > the embedded stories260K."""

from __future__ import annotations

from pathlib import Path

from ..config import PluginConfig
from ..embedded import embedded_model_path
from .devices import check_device

__all__ = ["format_bytes", "load_model", "resolve_model"]


def resolve_model(cli_model: str | None, config: PluginConfig) -> str:
    """``--model`` > the config's ``model:`` > the model shipped with the package (stories260K)."""
    if cli_model:
        return cli_model
    if config.model:
        return config.model
    try:
        return str(embedded_model_path())
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_local_model(name: str) -> None:
    """A name that is a path (or cannot be a Hugging Face id) has to be a folder holding config.json."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model path {name!r} has no config.json: pass a folder with config.json, weights and tokenizer "
                "files (as `save_pretrained` writes it), or leave out `--model` to run the embedded stories260K"
            )
    elif not _is_hub_id(name):
        raise ValueError(
            f"model path {name!r} does not exist (looked for {path.resolve()}): pass an existing folder with "
            "config.json, weights and tokenizer files, a Hugging Face id, or leave out `--model` to run the "
            "embedded stories260K"
        )


def load_model(name: str, device: str):
    """(model in eval mode on ``device``, tokenizer); a missing device or model is a ``ValueError`` saying what to
    pass, raised before anything is loaded where it can be seen without loading."""
    target = check_device(device)
    _check_local_model(name)
    # imported here: transformers' auto classes are slow to import and only a command needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name).to(target).eval()
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load model {name!r}: {exc}\nPass `--model` with a Hugging Face id or a local path "
            "to a directory with config.json, weights and tokenizer files."
        ) from None
    return model, tokenizer

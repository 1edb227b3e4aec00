"""Reading a YAML file or a mapping into a ``PluginConfig``, every problem reported at once."""

from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from .sections import PluginConfig, section_dependencies
from .validation import ConfigError, Problem, _annotation_at, _plain, translate

__all__ = ["load_config", "parse_config"]

_PLUGIN = pydantic.TypeAdapter(PluginConfig)


def parse_config(data: dict | None) -> PluginConfig:
    """Build a ``PluginConfig`` from an already-parsed mapping; ``ConfigError`` lists every problem."""
    if data is None:
        data = {}
    if not isinstance(data, (dict, PluginConfig)):
        raise ConfigError([Problem((), f"`config` has to be a mapping but got {type(data).__name__}: {data!r}")])
    try:
        return _PLUGIN.validate_python(data)
    except pydantic.ValidationError as exc:
        problems = translate(exc, PluginConfig, "config")
        problems += _checks_beside_refused_keys(data, exc, {str(p) for p in problems})
        if all(err["loc"] for err in exc.errors()):
            # a section failed, so the checks across sections did not run: those that need only the
            # sections' presence still can
            problems += section_dependencies(_present_sections(data))
        raise ConfigError(problems) from None


def _checks_beside_refused_keys(data: dict, exc: pydantic.ValidationError, known: set[str]) -> list[Problem]:
    """A section with a refused key never ran its checks across keys; run them on the keys it took, the
    refused ones at their defaults (and say so), so that one pass reports every problem."""
    refused: dict[tuple, set] = {}
    for err in exc.errors():
        loc = err["loc"]
        for depth in range(1, len(loc)):  # every section on the way down: the root's checks run elsewhere
            if is_dataclass(_plain(_annotation_at(PluginConfig, loc[:depth]))):
                refused.setdefault(loc[:depth], set()).add(loc[depth])
    found = []
    for where, keys in refused.items():
        section, raw = _plain(_annotation_at(PluginConfig, where)), data
        for key in where:
            raw = raw.get(key) if isinstance(raw, dict) else None
        if not isinstance(raw, dict):
            continue
        try:
            section(**{k: v for k, v in raw.items() if k not in keys})
        except ConfigError as error:
            defaulted = sorted(f.name for f in fields(section) if f.name in keys)
            note = f" (checked with {defaulted} at their defaults)" if defaulted else ""
            found += [p._replace(text=p.text + note).under(where) for p in error.problems
                      if str(p.under(where)) not in known]  # fmt: skip
        except (TypeError, ValueError):
            continue  # keys the section cannot take at all: their own problems are reported already
    return found


def _present_sections(data: Any) -> set[str]:
    return {k for k, v in data.items() if v is not None} if isinstance(data, dict) else set()


def load_config(path: str | Path) -> PluginConfig:
    """Read a YAML file into a ``PluginConfig``; every error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise ValueError(f"config file {str(path)!r} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise exc.in_file(str(path)) from None

"""How sections are declared and how their errors are reported.

Each section is a pydantic dataclass: types and bounds sit in its annotations
(so the JSON schema carries them too), checks across keys in ``_problems``.
Pydantic collects every failure of a whole tree; ``ConfigError`` turns them
into one message with a line per problem, each naming the key path, the value
received and what is allowed.
"""

import functools
import types
import typing
from collections.abc import Iterable, Iterator
from dataclasses import fields, is_dataclass
from typing import Annotated, Any, NamedTuple

import pydantic
import pydantic.dataclasses
from pydantic import ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError

from ..errors import KVCacheError

__all__ = [
    "MAX_SECONDS", "MAX_SIZE_MB", "Bool", "Checked", "ConfigError", "Float", "Fraction", "MiB", "NonNegativeFloat",
    "NonNegativeInt", "NonNegativeMiB", "NonNegativeSeconds", "PositiveFloat", "PositiveInt", "Problem", "Seconds",
    "Str", "doc", "exact_choice", "section", "translate",
]  # fmt: skip

# Strict scalars, as YAML gives them: `true` is no integer, "5" no number. A float
# key takes an integer (YAML `1`) and stores it as a float; NaN and infinities are
# refused for every float (a NaN would pass every `< 0` check).
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]

# Finite is not enough: a timer or lock wait of 1e300 s overflows (OverflowError) or never ends, and a budget
# of 1e308 MiB overflows when turned into bytes. A day and a pebibyte are far beyond any real setting.
MAX_SECONDS = 86_400.0
MAX_SIZE_MB = float(2**30)
Seconds = Annotated[float, Strict(), Field(gt=0, le=MAX_SECONDS)]
NonNegativeSeconds = Annotated[float, Strict(), Field(ge=0, le=MAX_SECONDS)]
MiB = Annotated[float, Strict(), Field(gt=0, le=MAX_SIZE_MB)]
NonNegativeMiB = Annotated[float, Strict(), Field(ge=0, le=MAX_SIZE_MB)]

_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
_TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "dict_type", "list_type", "dataclass_type"}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_UNKNOWN_KEY_ERRORS = {"unexpected_keyword_argument", "extra_forbidden"}


def doc(text: str) -> pydantic.fields.FieldInfo:
    """A key's description, for the JSON schema (``Annotated[T, doc("...")]``)."""
    return Field(description=text)


def _refuse_floats(value: Any) -> Any:
    # a Literal of ints compares by equality, so it would take 4.0 or True for 4
    if isinstance(value, (bool, float)):
        raise PydanticCustomError("literal_error", "not one of the choices")
    return value


def exact_choice(choices: Iterable[int]) -> Any:
    """``Literal[*choices]`` that takes only ints, not floats or bools equal to one."""
    return Annotated[typing.Literal[tuple(choices)], pydantic.BeforeValidator(_refuse_floats)]


class Problem(NamedTuple):
    """One thing wrong: ``path`` is the key (or, with ``whole``, the section) it is about."""

    path: tuple
    text: str
    whole: bool = False

    def under(self, loc: tuple) -> "Problem":
        return self._replace(path=(*loc, *self.path))

    def __str__(self) -> str:
        where = ".".join(map(str, self.path))
        if self.whole:
            return f"{self.text} (in `{where}`)" if where else self.text
        return f"`{where}` {self.text}"


class ConfigError(KVCacheError, ValueError):
    """Every problem found in a config at once; ``errors`` holds one message per problem."""

    code = "config_invalid"
    detail_fields = ("errors", "source")

    def __init__(self, problems: Iterable[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        self.errors = [str(p) for p in self.problems]
        if len(self.errors) == 1:
            message = self.errors[0]
        else:
            message = f"{len(self.errors)} problems:\n" + "\n".join(f"- {e}" for e in self.errors)
        super().__init__(f"{source}: {message}" if source else message)

    def in_file(self, source: str) -> "ConfigError":
        return ConfigError(self.problems, source)

    def __reduce__(self) -> tuple:
        # the default rebuilds from the message; a process pool needs the problems back
        return ConfigError, (self.problems, self.source)

    @classmethod
    def from_validation(cls, exc: pydantic.ValidationError, root: type, label: str) -> "ConfigError":
        """Translate pydantic's errors for ``root`` (``label`` names it where no key does)."""
        return cls(translate(exc, root, label))


class Checked:
    """Base of every section: ``_problems`` yields what is wrong across keys, after the keys' own checks."""

    def _problems(self) -> Iterator[Problem]:
        return iter(())

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError(problems)


def section(cls: type) -> type:
    """Make ``cls`` a validated dataclass whose constructor raises ``ConfigError``."""
    cls = pydantic.dataclasses.dataclass(cls, config=_CONFIG)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise ConfigError.from_validation(exc, cls, cls.__name__) from None

    cls.__init__ = __init__
    return cls


# ---------------------------------------------------------------------- pydantic errors -> problems
def translate(exc: pydantic.ValidationError, root: type, label: str) -> list[Problem]:
    problems: list[Problem] = []
    unknown: dict[tuple, list] = {}
    for err in exc.errors(include_url=False):
        loc, kind = _field_names(root, err["loc"]), err["type"]
        if kind in _UNKNOWN_KEY_ERRORS:
            if loc[:-1] not in unknown:
                unknown[loc[:-1]] = []
                problems.append(Problem(loc[:-1], "", whole=True))  # placeholder, keeps the order
            unknown[loc[:-1]].append(loc[-1])
            continue
        error = err.get("ctx", {}).get("error")
        if kind == "value_error" and isinstance(error, ConfigError):
            problems.extend(p.under(loc) for p in error.problems)
            continue
        problems.append(_problem(root, loc, kind, err))
    out = []
    for problem in problems:
        if problem.text:
            out.append(problem)
        else:
            out.extend(_unknown_keys(root, problem.path, unknown[problem.path], label))
    return out


def _field_names(root: type, loc: tuple) -> tuple:
    """``loc`` with positional argument indices of a dataclass replaced by the field names."""
    if loc and isinstance(loc[0], int) and is_dataclass(root):
        names = [f.name for f in fields(root)]
        if loc[0] < len(names):
            return (names[loc[0]], *loc[1:])
    return tuple(loc)


def _unknown_keys(root: type, where: tuple, keys: list, label: str) -> list[Problem]:
    cls = _plain(_annotation_at(root, where))
    moved = getattr(cls, "MOVED_KEYS", {})
    problems = [Problem((*where, k), f"moved to `{'.'.join(map(str, (*where, *moved[k].split('.'))))}`")
                for k in keys if k in moved]
    rest = sorted((k for k in keys if k not in moved), key=str)
    if rest:
        allowed = sorted(f.name for f in fields(cls)) if is_dataclass(cls) else []
        name = ".".join(map(str, where)) or label
        problems.append(Problem((), f"unknown key(s) {rest} in `{name}`; allowed keys are {allowed}", whole=True))
    return problems


def _problem(root: type, loc: tuple, kind: str, err: dict) -> Problem:
    value = err.get("input")
    if loc and loc[-1] == "[key]":
        mapping = _annotation_at(root, loc[:-2])
        key_type = typing.get_args(_plain(mapping))[0]
        return Problem(loc[:-2], f"keys have to be {_description(key_type) or _describe(key_type)} but got {value!r}")
    annotation = _annotation_at(root, loc)
    if kind in _TYPE_ERRORS:
        return Problem(loc, f"has to be of type {_describe(annotation)} but got {type(value).__name__}: {value!r}")
    or_null = " or null" if _nullable(annotation) else ""
    if kind == "literal_error":
        return Problem(loc, f"has to be one of {list(typing.get_args(_plain(annotation)))}{or_null} but got {value!r}")
    if kind in _BOUND_ERRORS:
        return Problem(loc, f"has to be {_bounds(annotation)}{or_null} but got {value!r}")
    if kind == "finite_number":
        return Problem(loc, f"has to be a finite number but got {value!r}")
    if kind == "value_error":
        return Problem(loc, f"is refused: {err['ctx']['error']} (got {value!r})")
    return Problem(loc, f"is refused: {err['msg']} (got {value!r})")


def _annotation_at(root: type, loc: tuple) -> Any:
    annotation = root
    for part in loc:
        inner = _plain(annotation)
        origin = typing.get_origin(inner)
        if is_dataclass(inner):
            annotation = typing.get_type_hints(inner, include_extras=True).get(part, Any)
        elif origin is dict:
            annotation = typing.get_args(inner)[1]
        elif origin is list:
            annotation = typing.get_args(inner)[0]
        else:
            return Any
    return annotation


def _plain(annotation: Any) -> Any:
    """``annotation`` without ``Annotated`` and without ``| None``."""
    if typing.get_origin(annotation) is Annotated:
        return _plain(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _plain(rest[0]) if len(rest) == 1 else annotation
    return annotation


def _metadata(annotation: Any) -> list:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _metadata(a)]
    if typing.get_origin(annotation) is Annotated:
        # a Field's bounds are kept in its own metadata
        found = [n for m in annotation.__metadata__ for n in (m, *getattr(m, "metadata", ()))]
        return found + _metadata(typing.get_args(annotation)[0])
    return []


def _description(annotation: Any) -> str | None:
    return next((m.description for m in _metadata(annotation) if getattr(m, "description", None)), None)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        return _describe(typing.get_args(annotation)[0])
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(annotation))
    if is_dataclass(annotation) or origin is dict:
        return "mapping"
    if origin is list:
        return f"list[{_describe(typing.get_args(annotation)[0])}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _nullable(annotation: Any) -> bool:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return union and type(None) in typing.get_args(annotation)


def _bounds(annotation: Any) -> str:
    low = high = None
    for m in _metadata(annotation):
        for name, bracket in (("ge", "["), ("gt", "(")):
            if getattr(m, name, None) is not None:
                low = (bracket, getattr(m, name))
        for name, bracket in (("le", "]"), ("lt", ")")):
            if getattr(m, name, None) is not None:
                high = (bracket, getattr(m, name))
    if low == ("[", 1) and high is None and _plain(annotation) is int:
        return "a positive integer"
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return "in range"


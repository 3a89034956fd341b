"""The config's building blocks: ConfigError (key path + reason), strict scalar types for TOML
values, and pydantic's validation errors rewritten as ConfigErrors with the same key paths and
wording the hand-written checks use."""
from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError

__all__ = ["ConfigError", "ConfigTable", "Int", "Float", "Bool", "Str", "config_error", "suggest", "unwrap_optional",
           "strip_annotated", "is_table"]


class ConfigError(ValueError):
    """A bad configuration. `errors` holds (key_path, reason) pairs; str() names them all."""

    def __init__(self, errors: list[tuple[str, str]] | str, reason: str | None = None):
        if isinstance(errors, str):
            errors = [(errors, reason or "invalid value")]
        self.errors = list(errors)
        super().__init__("; ".join(f"{path}: {why}" if path else why for path, why in self.errors))

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.errors]


# ---- scalar types --------------------------------------------------------------------------------
# TOML values are taken as written: pydantic's lax mode would turn "2" or true into 2 and 1 into
# true, which hides typos in a hand-written config. An integral float is an int (forms send 4.0).


def _scalar(ok: typing.Callable[[Any], bool], convert: typing.Callable[[Any], Any], expected: str) -> PlainValidator:
    def check(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("config_type", "expected {expected}, got {got}",
                                      {"expected": expected, "got": repr(value)})
        return convert(value)

    return PlainValidator(check)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


Int = Annotated[int, _scalar(lambda v: _is_number(v) and (isinstance(v, int) or v.is_integer()), int, "an integer")]
Float = Annotated[float, _scalar(_is_number, float, "a number")]
Bool = Annotated[bool, _scalar(lambda v: isinstance(v, bool), bool, "true or false")]
Str = Annotated[str, _scalar(lambda v: isinstance(v, str), str, "a string")]

# ---- annotations ---------------------------------------------------------------------------------


def strip_annotated(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without `| None` and without Annotated metadata, whether None was allowed)."""
    tp = strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return strip_annotated(args[0]), True
    return tp, False


def is_table(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _annotation_at(root: type[BaseModel], loc: tuple) -> Any:
    """The type found at a pydantic error location (field names and list indexes) below `root`."""
    tp: Any = root
    for part in loc:
        tp, _ = unwrap_optional(tp)
        tp = typing.get_args(tp)[0] if isinstance(part, int) else tp.model_fields[part].annotation
    return unwrap_optional(tp)[0]


# ---- pydantic errors as ConfigErrors -------------------------------------------------------------

def _key_path(prefix: str, loc: tuple) -> str:
    """("dataset", "directory", 0, "path") -> "dataset.directory[0].path" (after `prefix`)."""
    return prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def config_error(exc: ValidationError, root: type[BaseModel], prefix: str) -> ConfigError:
    errors = exc.errors()
    # A table with unknown keys reports only those: its values (and tables below it) may be
    # misnamed, so their errors would mislead.
    bad_tables = {e["loc"][:-1] for e in errors if e["type"] == "extra_forbidden"}

    def hidden(e: Any) -> bool:
        own = e["loc"][:-1] if e["type"] == "extra_forbidden" else None
        return any(e["loc"][:len(t)] == t and t != own for t in bad_tables)

    return ConfigError([pair for e in errors if not hidden(e) for pair in _pairs(e, root, prefix)])


def _pairs(error: Any, root: type[BaseModel], prefix: str) -> list[tuple[str, str]]:
    """One error's (key path, reason); a nested model that raised its own ConfigError keeps its paths."""
    path = _key_path(prefix, error["loc"])
    inner = error.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError):
        return [(f"{path}.{sub}" if sub else path, why) for sub, why in inner.errors]
    return [(path, _reason(error, root, prefix))]


def suggest(word: str, names: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _reason(error: Any, root: type[BaseModel], prefix: str) -> str:
    kind, loc, value = error["type"], error["loc"], error.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key" + suggest(str(loc[-1]), _annotation_at(root, loc[:-1]).model_fields)
    if value is None:
        return "must not be empty"
    if kind == "model_type":
        return "expected a table"
    if kind == "list_type":
        return f"expected a list, got {type(value).__name__}"
    if kind == "literal_error":
        allowed = typing.get_args(_annotation_at(root, loc))
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{value!r} is not one of {', '.join(map(repr, allowed))}{hint}"
    return error["msg"]  # our scalar validators' own words


# ---- the base of every table ----------------------------------------------------------------------


class ConfigTable(BaseModel):
    """One TOML table. Direct construction and assignment raise ConfigError with the table's key path."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    table_path: ClassVar[str] = ""  # where the table sits in the TOML, e.g. "optimizer."

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.table_path) from None

    # Otherwise pydantic would call this __init__ for every nested table it validates, and the
    # outer table would see a ConfigError instead of the errors it rewrites with the full path.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise config_error(exc, type(self), self.table_path) from None

    @classmethod
    def parse(cls, data: Any, *, from_attributes: bool = False) -> Any:
        """Validate a parsed TOML table (or, with `from_attributes`, an object with the same fields)."""
        try:
            return cls.model_validate(data, from_attributes=from_attributes)
        except ValidationError as exc:
            raise config_error(exc, cls, cls.table_path) from None

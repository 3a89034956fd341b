"""The training config's form fields by key path (`model.dtype`, `optimizer.lr`, ...): what the Train
tab builds its widgets from. Tables marked `form: False` ([sample], eval and diffusion-pipe dataset
options) and `[[directory]]` lists are set in TOML only."""
from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from engine.config import TrainConfig
from engine.config_types import is_table, strip_annotated, unwrap_optional

__all__ = ["FieldSpec", "config_fields"]


@dataclass(frozen=True)
class FieldSpec:
    path: str
    type: str  # "int" | "float" | "bool" | "str" | "list[int]" | "list[float]" | "list[str]"
    default: Any
    choices: tuple | None
    help: str
    optional: bool = False


def config_fields() -> list[FieldSpec]:
    """Every scalar/list field of TrainConfig by key path (nested tables flattened, directories excluded)."""
    specs: list[FieldSpec] = []
    _collect_fields(TrainConfig, "", specs)
    return specs


def _collect_fields(cls: type[BaseModel], prefix: str, out: list[FieldSpec]) -> None:
    for name, info in cls.model_fields.items():
        path = f"{prefix}{name}"
        inner, optional = unwrap_optional(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get("form") is False:
            continue  # set in TOML only (diffusion-pipe's dataset and eval options, [sample])
        if is_table(inner):
            _collect_fields(inner, path + ".", out)
            continue
        if typing.get_origin(inner) is list and is_table(strip_annotated(typing.get_args(inner)[0])):
            continue  # [[directory]] tables are edited as a list, not as form fields
        # A fresh copy: the form may mutate a list default.
        default = None if info.is_required() else copy.deepcopy(info.get_default(call_default_factory=True))
        choices = extra.get("choices")
        if choices is None and typing.get_origin(inner) is Literal:
            choices = typing.get_args(inner)
        out.append(FieldSpec(path, _type_name(inner), default, choices, info.description or "", optional))


def _type_name(tp: Any) -> str:
    tp = strip_annotated(tp)
    if typing.get_origin(tp) is Literal:
        return "str"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))

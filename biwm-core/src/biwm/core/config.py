"""Shared pieces of configuration models: strict models and input paths resolved against the recipe."""

from __future__ import annotations

import contextvars
import math
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

_base_dir: contextvars.ContextVar[Path] = contextvars.ContextVar("biwm_recipe_base_dir", default=Path("."))


def _resolve(value: Any) -> Any:
    if isinstance(value, (str, Path)) and str(value):
        path = Path(value).expanduser()
        # absolute, so recipe snapshots in run folders stay valid wherever they are read from
        return Path(os.path.abspath(path if path.is_absolute() else _base_dir.get() / path))
    return value


def _must_exist(kind: str):
    def check(path: Path) -> Path:
        ok = path.is_dir() if kind == "directory" else path.is_file() if kind == "file" else path.exists()
        if not ok:
            raise ValueError(f"{kind} not found: {path}")
        return path
    return check


InputDir = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_must_exist("directory"))]
InputFile = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_must_exist("file"))]
InputPath = Annotated[Path, BeforeValidator(_resolve), AfterValidator(_must_exist("path"))]


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4


def show(value: Any) -> str:
    """A value as an error message may echo it: short, whatever it is."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
    return _REPR.repr(value)


FLOAT32_MAX = 3.4028234663852886e38
INT64 = 2**63


def _number_in_range(value: Any) -> Any:
    """Numbers a run can compute with: floats finite and within float32 (the training dtype: 1e39
    is inf there), integers within int64 (what torch and seeds take). Lists and tuples element-wise."""
    if isinstance(value, (list, tuple)):
        for item in value:
            _number_in_range(item)
    elif isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"{value} is not a finite number within float32 range (|x| <= {FLOAT32_MAX:.3g})")
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ValueError(f"an integer of about {value.bit_length() * 0.30103:.0f} digits is outside int64")
    return value


def range_checked(options: type[BaseModel]) -> type[BaseModel]:
    """``options`` as a subclass that rejects unknown fields and out-of-range numbers, whatever the
    model itself declares (the registry applies it to every plugin's options model)."""
    config = ConfigDict(options.model_config)
    config["extra"] = "forbid"
    return type(options.__name__, (options,), {"__module__": options.__module__, "__doc__": options.__doc__,
                                                 "model_config": config, "_numbers_in_range": _numbers_validator})


_numbers_validator = field_validator("*", mode="after")(lambda cls, value: _number_in_range(value))


class Strict(BaseModel):
    """Recipe sections: unknown fields and out-of-range numbers are errors."""

    model_config = ConfigDict(extra="forbid")
    _numbers_in_range = _numbers_validator


class PluginRef(Strict):
    """A plugin by name, with its options (validated later against the plugin's own model)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_as_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

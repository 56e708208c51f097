"""Shared pieces of configuration models: strict models and input paths resolved against the recipe."""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")




class PluginRef(Strict):
    """A plugin by name, with its options (validated later against the plugin's own model)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _name_as_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

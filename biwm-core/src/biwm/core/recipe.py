"""Recipes: YAML -> pydantic models, with every error naming the field, the value and what is allowed.

Validation is two-pass: the recipe's own schema (data, model, stages), then each plugin reference
against the registry of its kind and the plugin's own options model. Relative input paths
resolve against the recipe file's folder; ``run_dir`` resolves against the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from biwm.core.config import PluginRef, Strict, _base_dir
from biwm.core.plugins import PluginManager, UnknownPluginError, get_plugin_manager
from biwm.core.stages import STAGE_CONFIGS
from biwm.core.toyworld import ToyWorldConfig

class ModelConfig(Strict):
    backbone: PluginRef
    controls: list[PluginRef] = Field(default_factory=list)
    compressor: PluginRef = Field(default_factory=lambda: PluginRef(name="none"))
    attention: Literal["bidirectional", "causal"] = Field(
        "bidirectional", description="window attention; causal (history blind to the chunk, frames causal "
                                     "within it) exists as the baseline BiWM is measured against")

    @model_validator(mode="before")
    @classmethod
    def _names_as_strings(cls, data: Any) -> Any:
        """Allow ``controls: [actions, plucker]`` and ``compressor: none`` shorthands."""
        if isinstance(data, dict):
            data = dict(data)
            for key in ("backbone", "compressor"):
                if isinstance(data.get(key), str):
                    data[key] = {"name": data[key]}
            if isinstance(data.get("controls"), list):
                data["controls"] = [{"name": c} if isinstance(c, str) else c for c in data["controls"]]
        return data


class ToyWorldData(Strict):
    source: Literal["toyworld"] = "toyworld"
    train_clips: int = Field(256, ge=1)
    heldout_clips: int = Field(8, ge=1)
    frames: int = Field(16, ge=2, description="video frames per clip")
    prompt: str = ""
    toyworld: ToyWorldConfig = Field(default_factory=ToyWorldConfig)


StageConfig = Annotated[Union[tuple(STAGE_CONFIGS.values())], Field(discriminator="stage")]  # type: ignore[valid-type]


class Recipe(Strict):
    name: str = "run"
    run_dir: Path = Path("runs/run")
    seed: int = 0
    data: ToyWorldData = Field(default_factory=ToyWorldData)
    model: ModelConfig
    stages: list[StageConfig] = Field(min_length=1)
    # Filled after validation: the resolved plugin options, keyed like the recipe.
    resolved: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def stage_names(self) -> list[str]:
        return [s.stage for s in self.stages]

    def snapshot(self) -> dict[str, Any]:
        """The recipe as it ran: plugin options with their defaults filled in and every input path
        absolute, so ``validate_recipe(recipe.snapshot())`` rebuilds the same run from anywhere."""
        data = self.model_dump(mode="json")
        model = data["model"]
        for key, ref in (("model.backbone", model["backbone"]), ("model.compressor", model["compressor"]),
                         *((f"model.controls[{i}]", c) for i, c in enumerate(model["controls"]))):
            if key in self.resolved:
                ref["options"] = self.resolved[key].model_dump(mode="json")
        return data


class FieldError(Exception):
    def __init__(self, loc: str, message: str):
        self.loc, self.message = loc, message
        super().__init__(f"{loc}: {message}" if loc else message)


class RecipeError(Exception):
    """One or more problems in a recipe; ``str()`` lists each as ``field: problem``."""

    def __init__(self, errors: list[FieldError], source: str = "recipe"):
        self.errors, self.source = errors, source
        super().__init__("\n".join(f"{source}: {e}" for e in errors))


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


def _expected(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The annotation of the field an error points at, so type errors say what is allowed."""
    field = None
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return ""
        field = fields[part]
        current = field.annotation
    if field is None:
        return ""
    ann = field.annotation
    text = getattr(ann, "__name__", None) or str(ann).replace("typing.", "").replace("pathlib.", "")
    constraints = [str(m) for m in field.metadata if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")]
    return f"; expected {text}" + (f" ({', '.join(constraints)})" if constraints else "")


def _pydantic_errors(exc: ValidationError, prefix: tuple[Any, ...], model: type[BaseModel]) -> list[FieldError]:
    out = []
    for err in exc.errors(include_url=False):
        raw = err["loc"]
        loc, where_model, sub = raw, model, raw
        if prefix == () and len(raw) > 2 and raw[0] == "stages" and raw[2] in STAGE_CONFIGS:
            loc = raw[:2] + raw[3:]  # drop the discriminator tag pydantic puts in the location
            where_model, sub = STAGE_CONFIGS[raw[2]], raw[3:]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            parent_fields = _fields_at(where_model, sub[:-1])
            msg = f"unknown field {loc[-1]!r}" + (f"; allowed: {', '.join(parent_fields)}" if parent_fields else "")
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown stage {err['input'].get('stage') if isinstance(err['input'], dict) else err['input']!r}; allowed: {', '.join(STAGE_CONFIGS)}"
        else:
            if "input" in err and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r}){_expected(where_model, sub)}"
        out.append(FieldError(_loc(prefix + loc), msg))
    return out


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _check_plugins(model: ModelConfig, stages: list[Any], pm: PluginManager,
                   resolved: dict[str, Any]) -> list[FieldError]:
    """Look up every plugin reference and validate its options; fills ``resolved``."""
    errors: list[FieldError] = []
    refs: list[tuple[str, str, PluginRef]] = [("backbone", "model.backbone", model.backbone),
                                               ("compressor", "model.compressor", model.compressor)]
    refs += [("control", f"model.controls[{i}]", ref) for i, ref in enumerate(model.controls)]
    for stage_index, stage in enumerate(stages):
        losses = stage.get("losses") if isinstance(stage, dict) else getattr(stage, "losses", None)
        for i, ref in enumerate(losses or []):
            try:
                ref = ref if isinstance(ref, PluginRef) else PluginRef.model_validate(
                    {"name": ref} if isinstance(ref, str) else ref)
            except ValidationError:
                continue  # reported by the schema pass
            refs.append(("loss", f"stages[{stage_index}].losses[{i}]", ref))
    seen_controls: set[str] = set()
    for kind, where, ref in refs:
        try:
            spec = pm.get(kind, ref.name)
        except UnknownPluginError as exc:
            errors.append(FieldError(f"{where}.name", f"unknown {kind} {ref.name!r}; allowed: "
                                     f"{', '.join(exc.allowed) or '(none installed)'}"))
            continue
        if kind == "control":
            if ref.name in seen_controls:
                errors.append(FieldError(f"{where}.name", f"control {ref.name!r} is listed twice"))
            seen_controls.add(ref.name)
        try:
            resolved[where] = spec.options.model_validate(ref.options)
        except ValidationError as exc:
            errors += _pydantic_errors(exc, tuple(f"{where}.options".split(".")), spec.options)
    return errors


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``a.b=c`` / ``stages[0].steps=5`` / ``finetune.steps=5`` (a stage by name); values parse as YAML."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError([FieldError("--set", f"expected key=value, got {item!r}")])
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        parts: list[Any] = [int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]", key.strip()) if p]
        if parts and isinstance(parts[0], str) and parts[0] in STAGE_CONFIGS:
            names = [s.get("stage") for s in data.get("stages", []) if isinstance(s, dict)]
            if parts[0] not in names:
                raise RecipeError([FieldError(f"--set {key}", f"the recipe has no {parts[0]!r} stage; "
                                              f"stages: {', '.join(map(str, names))}")])
            parts = ["stages", names.index(parts[0])] + parts[1:]
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise RecipeError([FieldError(f"--set {key}", f"no list item {part!r}")])
                node = node[part]
            else:
                if part not in node or node[part] is None:
                    node[part] = [] if isinstance(nxt, int) else {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not isinstance(last, int) or last >= len(node):
                raise RecipeError([FieldError(f"--set {key}", f"no list item {last!r}")])
        node[last] = value
    return data


def load_recipe_data(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([FieldError("", f"recipe file not found: {path}")], source=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError([FieldError("", f"invalid YAML: {exc}")], source=str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError([FieldError("", "expected a mapping at the top level of the recipe")], source=str(path))
    return data


def validate_recipe(data: dict[str, Any], base_dir: Path = Path("."), source: str = "recipe",
                    pm: PluginManager | None = None) -> Recipe:
    """Schema and plugin checks; all problems are collected before raising one RecipeError."""
    pm = pm or get_plugin_manager()
    token = _base_dir.set(Path(base_dir))
    errors: list[FieldError] = []
    recipe = None
    try:
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as exc:
            errors += _pydantic_errors(exc, (), Recipe)
        resolved: dict[str, Any] = {}
        if recipe is not None:
            errors += _check_plugins(recipe.model, recipe.stages, pm, resolved)
            errors += [FieldError(f"stages[{i}]", msg) for i, s in enumerate(recipe.stages)
                       for msg in getattr(s, "check", lambda r: [])(recipe)]
            recipe.resolved = resolved
        else:  # still report plugin problems alongside schema problems
            try:
                model = ModelConfig.model_validate(data.get("model"))
            except ValidationError:
                model = None
            if model is not None:
                stages = data.get("stages") if isinstance(data.get("stages"), list) else []
                errors += _check_plugins(model, stages, pm, resolved)
    finally:
        _base_dir.reset(token)
    if errors or recipe is None:
        raise RecipeError(errors, source=source)
    return recipe


def load_recipe(path: Path, overrides: list[str] | None = None, pm: PluginManager | None = None) -> Recipe:
    path = Path(path)
    data = apply_overrides(load_recipe_data(path), overrides or [])
    return validate_recipe(data, base_dir=path.parent, source=str(path), pm=pm)

"""Recipes: YAML -> pydantic models, with every error naming the field, the value and what is allowed.

Validation is two-pass: the recipe's own schema (data, model, stages), then each plugin reference
against the registry of its kind and the plugin's own options model. The stages are a plugin kind
too: :func:`recipe_model` types ``stages:`` as the union of the registered stages' config models,
told apart by their ``stage`` field, so a plugin's stage validates like a built-in one. So is the
data: ``data:`` is the options of the dataset its ``source`` names (default ``toyworld``, the toy
world of biwm-toyworld), and
:func:`dataset_for` makes that dataset (a :class:`biwm.core.protocols.ClipSource`). Relative
input paths resolve against the recipe file's folder; ``run_dir`` resolves against the working
directory.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, PrivateAttr, ValidationError, create_model,
                      field_validator)
from pydantic_core import PydanticCustomError

from biwm.core.config import PluginRef, Strict, _base_dir, show
from biwm.core.plugins import PluginManager, UnknownPluginError, get_plugin_manager

if typing.TYPE_CHECKING:
    from biwm.core.protocols import ClipSource

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything larger is not one
MAX_DEPTH = 64  # nesting levels of a recipe (ten are plenty)
MAX_ERRORS = 20  # problems listed before "... and N more"
DEFAULT_DATASET = "toyworld"  # the dataset of a recipe whose data names no source
# Where a first-party plugin comes from, for the error when it is not installed: (kind, name) -> distribution.
DISTRIBUTIONS = {("dataset", DEFAULT_DATASET): "biwm-toyworld"}


class ModelConfig(Strict):
    backbone: PluginRef
    controls: list[PluginRef] = Field(default_factory=list)
    compressor: PluginRef = Field(default_factory=lambda: PluginRef(name="none"))
    attention: Literal["bidirectional", "causal"] = Field(
        "bidirectional", description="window attention; causal (history blind to the chunk, frames causal "
                                     "within it) exists as the baseline BiWM is measured against")
    quantize: PluginRef | None = Field(
        None, description="quantizer of the transformer's linear layers, in training and inference alike (its "
                          "training form: e.g. {name: nvfp4} fake-quantises them), recorded in the model card")


class Recipe(Strict):
    """A recipe. Validate one with :func:`validate_recipe`, which uses :func:`recipe_model`: this
    base class leaves ``data`` and ``stages`` untyped, since the datasets and the stages are
    whatever the plugins register."""

    name: str = "run"
    run_dir: Path = Path("runs/run")
    seed: int = Field(0, ge=0, lt=2**32)
    data: Any = Field(default_factory=dict)  # the options model of the dataset data.source names (see recipe_model)
    model: ModelConfig
    stages: list[Any] = Field(min_length=1)  # each a stage's config model (see recipe_model)
    stage_configs: ClassVar[dict[str, type[BaseModel]]] = {}  # name -> config model, set by recipe_model
    dataset_configs: ClassVar[dict[str, type[BaseModel]]] = {}  # name -> options model, set by recipe_model
    # Filled by validate_recipe: the resolved plugin options, keyed like the recipe (not a recipe field).
    _resolved: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("run_dir", mode="before")
    @classmethod
    def _run_dir_named(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)) and not str(value).strip():
            raise ValueError("run_dir is empty; name the folder the run writes to")
        return value

    @property
    def resolved(self) -> dict[str, Any]:
        return self._resolved

    def stage_names(self) -> list[str]:
        return [s.stage for s in self.stages]

    def snapshot(self) -> dict[str, Any]:
        """The recipe as it ran: plugin options with their defaults filled in and every input path
        absolute, so ``validate_recipe(recipe.snapshot())`` rebuilds the same run from anywhere."""
        data = self.model_dump(mode="json")
        model = data["model"]
        for key, ref in (("model.backbone", model["backbone"]), ("model.compressor", model["compressor"]),
                         ("model.quantize", model["quantize"]),
                         *((f"model.controls[{i}]", c) for i, c in enumerate(model["controls"]))):
            if key in self.resolved:
                ref["options"] = self.resolved[key].model_dump(mode="json")
        return data


_RECIPE_MODELS: dict[tuple[tuple[tuple[str, type[BaseModel]], ...], ...], type[Recipe]] = {}


def recipe_model(pm: PluginManager | None = None) -> type[Recipe]:
    """:class:`Recipe` with ``stages`` typed by the stage registry: a list whose items are told apart
    by ``stage`` and validated by that stage's config model (a plugin's as much as a built-in's);
    and ``data`` by the dataset registry: the options model of the dataset ``data.source`` names
    (``toyworld`` when it names none). Built once per set of registered stages and datasets."""
    pm = pm or get_plugin_manager()
    configs = {name: spec.options for name, spec in pm.registry("stage").items()}
    datasets = {name: spec.options for name, spec in pm.registry("dataset").items()}
    key = (tuple(configs.items()), tuple(datasets.items()))
    if key not in _RECIPE_MODELS:
        item: Any = Annotated[Union[tuple(configs.values())], Field(discriminator="stage")] if configs else \
            Annotated[Any, AfterValidator(_no_stages)]
        data: Any = Annotated[Union[tuple(datasets.values())], Field(discriminator="source")] if datasets else \
            Annotated[Any, AfterValidator(_no_datasets)]
        model = create_model("Recipe", __base__=Recipe, __module__=__name__,
                             data=(Annotated[data, BeforeValidator(_default_source)],
                                   Field(default_factory=dict, validate_default=True)),
                             stages=(list[item], Field(min_length=1)))
        model.stage_configs, model.dataset_configs = configs, datasets
        if len(_RECIPE_MODELS) > 16:  # registries rebuilt with other plugins (tests): forget the old ones
            _RECIPE_MODELS.clear()
        _RECIPE_MODELS[key] = model
    return _RECIPE_MODELS[key]


def _no_stages(value: Any) -> Any:
    tag = value.get("stage") if isinstance(value, dict) else value
    raise ValueError(f"unknown stage {show(tag)}; allowed: (none installed)")


def _default_source(value: Any) -> Any:
    """``data:`` without ``source`` is the toy world's options (every recipe before datasets were plugins;
    the toy world is biwm-toyworld's dataset, and without it the error says to install it)."""
    return {**value, "source": DEFAULT_DATASET} if isinstance(value, dict) and "source" not in value else value


def _no_datasets(value: Any) -> Any:
    """No dataset is registered: every source is unknown (reported as an unknown tag, like one
    that none of the registered datasets has)."""
    raise PydanticCustomError("union_tag_invalid", "no dataset is registered", {"tag": show(value)})


def dataset_for(recipe: Recipe, pm: PluginManager | None = None) -> "ClipSource":
    """The recipe's dataset: the plugin ``data.source`` names, made with the recipe's ``data`` options.
    Stages read clips only through it (``RunContext.dataset``)."""
    return (pm or get_plugin_manager()).get("dataset", recipe.data.source).create(recipe.data)


class FieldError(Exception):
    def __init__(self, loc: str, message: str):
        self.loc, self.message = loc, message
        super().__init__(f"{loc}: {message}" if loc else message)


class RecipeError(Exception):
    """One or more problems in a recipe; ``str()`` lists each as ``field: problem``."""

    def __init__(self, errors: list[FieldError], source: str = "recipe"):
        self.errors, self.source = errors, source
        shown = [f"{source}: {e}" for e in errors[:MAX_ERRORS]]
        if len(errors) > MAX_ERRORS:
            shown.append(f"{source}: ... and {len(errors) - MAX_ERRORS} more problems")
        super().__init__("\n".join(shown))


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + (p if isinstance(p, str) and len(p) <= 60 else show(p))
    return out


def describe(annotation: Any) -> str:
    """A field's type in words: ``int``, ``float or null``, ``one of 'a', 'b'``, ``list of str``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return describe(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(items) == len(args):
            return f"a list of {len(items)} ({', '.join(describe(a) for a in items)})"
        return f"a list of {describe(items[0])}" if items else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "a path"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {"Ge": ">=", "Gt": ">", "Le": "<=", "Lt": "<"}


def _expected(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """What the field an error points at allows, so type errors say it: ``; expected int >= 1``."""
    field = None
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return ""
        field = fields[part]
        current = field.annotation
    if field is None:
        return ""
    bounds = [f"{_BOUNDS[type(m).__name__]} {getattr(m, type(m).__name__.lower())}" for m in field.metadata
              if type(m).__name__ in _BOUNDS]
    return f"; expected {describe(field.annotation)}" + (f" {', '.join(bounds)}" if bounds else "")


def _pydantic_errors(exc: ValidationError, prefix: tuple[Any, ...], model: type[BaseModel],
                     pm: PluginManager | None = None) -> list[FieldError]:
    out = []
    stage_configs = getattr(model, "stage_configs", {}) if prefix == () else {}
    dataset_configs = getattr(model, "dataset_configs", {}) if prefix == () else {}
    for err in exc.errors(include_url=False):
        raw = err["loc"]
        loc, where_model, sub = raw, model, raw
        if len(raw) > 2 and raw[0] == "stages" and raw[2] in stage_configs:
            loc = raw[:2] + raw[3:]  # drop the discriminator tag pydantic puts in the location
            where_model, sub = stage_configs[raw[2]], raw[3:]
        elif len(raw) > 1 and raw[0] == "data" and raw[1] in dataset_configs:
            loc = raw[:1] + raw[2:]
            where_model, sub = dataset_configs[raw[1]], raw[2:]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parent_fields = _fields_at(where_model, sub[:-1])
            msg = f"unknown field {show(loc[-1])}" + (f"; allowed: {', '.join(parent_fields)}" if parent_fields else "")
        elif err["type"] == "union_tag_invalid":
            kind, field, allowed = (("dataset", "source", sorted(dataset_configs)) if raw == ("data",) else
                                    ("stage", "stage", list(stage_configs)))
            tag = err["input"].get(field) if isinstance(err["input"], dict) else err["input"]
            msg = _unknown_plugin(kind, UnknownPluginError(kind, tag, allowed), pm or get_plugin_manager())
            loc = ("data", "source") if kind == "dataset" else loc
        elif "input" in err and not isinstance(err["input"], dict):
            msg = f"{msg} (got {show(err['input'])}){_expected(where_model, sub)}"
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


def _unknown_plugin(kind: str, exc: UnknownPluginError, pm: PluginManager) -> str:
    """The unknown-plugin message, with why a plugin that might provide it is missing."""
    text = f"unknown {kind} {show(exc.name)}; allowed: {', '.join(exc.allowed) or '(none installed)'}"
    if isinstance(exc.name, str) and exc.name in pm.disabled_names():
        text += f"; {exc.name!r} is disabled by BIWM_DISABLE_PLUGINS"
    elif isinstance(exc.name, str) and (kind, exc.name) in DISTRIBUTIONS:
        dist = DISTRIBUTIONS[(kind, exc.name)]
        default = " (the data of a recipe whose data: names no source)" if (kind, exc.name) == (
            "dataset", DEFAULT_DATASET) else ""
        text += f"; {kind} {exc.name!r}{default} comes with {dist}: pip install {dist}"
    broken = [s for s in pm.statuses() if s.status == "broken"]
    if broken:
        text += "; plugins that failed to load: " + "; ".join(
            f"{s.name} ({s.distribution} {s.version}): {s.error}" for s in broken)
    return text


def _check_plugins(model: ModelConfig, stages: list[Any], pm: PluginManager,
                   resolved: dict[str, Any]) -> list[FieldError]:
    """Look up every plugin reference and validate its options; fills ``resolved``."""
    errors: list[FieldError] = []
    refs: list[tuple[str, str, PluginRef]] = [("backbone", "model.backbone", model.backbone),
                                               ("compressor", "model.compressor", model.compressor)]
    refs += [("control", f"model.controls[{i}]", ref) for i, ref in enumerate(model.controls)]
    if model.quantize is not None:
        refs.append(("quantizer", "model.quantize", model.quantize))
    for stage_index, stage in enumerate(stages):
        losses = stage.get("losses") if isinstance(stage, dict) else getattr(stage, "losses", None)
        if not isinstance(losses, list):
            continue  # not a list: reported by the schema pass
        for i, ref in enumerate(losses):
            try:
                ref = ref if isinstance(ref, PluginRef) else PluginRef.model_validate(ref)
            except ValidationError:
                continue  # reported by the schema pass
            refs.append(("loss", f"stages[{stage_index}].losses[{i}]", ref))
    seen_controls: set[str] = set()
    for kind, where, ref in refs:
        try:
            spec = pm.get(kind, ref.name)
        except UnknownPluginError as exc:
            errors.append(FieldError(f"{where}.name", _unknown_plugin(kind, exc, pm)))
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


def _geometry_errors(recipe: "Recipe") -> list[FieldError]:
    """Frame sizes the backbone's codec and patch size cannot take (its options' ``frame_geometry()``)."""
    options = recipe.resolved.get("model.backbone")
    geometry = getattr(options, "frame_geometry", None)
    if geometry is None:
        return []
    multiple = geometry()[1]
    sizes = getattr(recipe.data, "frame_size_fields", None)
    if sizes is None:  # a dataset whose options do not say its frame size
        return []
    return [FieldError(f"data.{path}", f"{value} is not a multiple of {multiple}, which backbone "
                       f"{recipe.model.backbone.name} needs (codec factor x patch size); try "
                       f"{max(multiple, round(value / multiple) * multiple)}")
            for path, value in sizes().items() if value % multiple]


def _model_file_errors(recipe: "Recipe") -> list[FieldError]:
    """Every model file a stage names (``init``, ``idm``) must be a readable safetensors file; a
    distilled model's metadata must hold what sampling needs."""
    from biwm.core.checkpoint import CorruptFileError
    from biwm.core.stages.common import model_metadata

    errors = []
    for i, stage in enumerate(recipe.stages):
        for name in ("init", "idm"):
            path = getattr(stage, name, None)
            if path is None:
                continue
            try:
                model_metadata(path)
            except CorruptFileError as exc:
                errors.append(FieldError(f"stages[{i}].{name}", str(exc)))
    return errors


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases (a 2 KB alias bomb expands to gigabytes, and the errors
    that echo it with it) and with bounded nesting."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a recipe; write the "
                                              "value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str) -> Any:
    """YAML text -> data, as recipes and ``--set`` values are read; ValueError with a one-line reason."""
    loader = None
    try:
        loader = _RecipeLoader(text)  # its reader already rejects control characters
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"invalid YAML{where}: {exc.problem or exc.context}") from None
    except yaml.reader.ReaderError as exc:
        raise ValueError(f"invalid YAML: character #x{exc.character:04x} at position {exc.position} is not "
                         "allowed") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"invalid YAML: {' '.join(str(exc).split())}") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"invalid YAML: {' '.join(str(exc).split())[:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()


_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*|\.\d{1,6}|\[\d{1,6}\])*")


def _key_parts(key: str) -> list[str | int]:
    """``a.b[0].c`` (or ``a.b.0.c``) -> ["a", "b", 0, "c"]; ValueError unless it is such a path."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"{show(key)} is not a field path like model.controls[0].options.x or finetune.steps")
    return [int(p) if p.isdigit() else p for p in re.findall(r"[A-Za-z_][\w-]*|\d+", key)]


def expand_shorthands(data: dict[str, Any]) -> dict[str, Any]:
    """Plugin references written as bare names (``controls: [actions]``, ``compressor: none``,
    ``losses: [dmd]``) as mappings, so ``--set`` can reach their options."""
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("backbone", "compressor"):
            if isinstance(model.get(key), str):
                model[key] = {"name": model[key]}
        if isinstance(model.get("controls"), list):
            model["controls"] = [{"name": c} if isinstance(c, str) else c for c in model["controls"]]
    for stage in data.get("stages") or [] if isinstance(data.get("stages"), list) else []:
        if isinstance(stage, dict) and isinstance(stage.get("losses"), list):
            stage["losses"] = [{"name": c} if isinstance(c, str) else c for c in stage["losses"]]
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "recipe",
                    pm: PluginManager | None = None) -> dict[str, Any]:
    """``a.b=c`` / ``stages[0].steps=5`` / ``finetune.steps=5`` (a registered stage by name); values
    parse as YAML. Every problem is a RecipeError naming the ``--set`` key."""
    expand_shorthands(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        where = f"--set {show(key) if len(key) > 60 else key}"

        def fail(message: str) -> RecipeError:
            return RecipeError([FieldError(where, message)], source=source)

        if not sep or not key:
            raise RecipeError([FieldError("--set", f"expected key=value, got {show(item)}")], source=source)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
            parts = _key_parts(key)
        except ValueError as exc:
            raise fail(str(exc)) from None
        if isinstance(parts[0], str) and parts[0] not in Recipe.model_fields and \
                parts[0] in (pm or get_plugin_manager()).registry("stage"):
            stages = data.get("stages") if isinstance(data.get("stages"), list) else []
            names = [s.get("stage") for s in stages if isinstance(s, dict)]
            if parts[0] not in names:
                raise fail(f"the recipe has no {parts[0]!r} stage; stages: {', '.join(map(str, names)) or 'none'}")
            parts = ["stages", names.index(parts[0])] + parts[1:]
        node: Any = data
        for i, part in enumerate(parts):
            path = _loc(tuple(parts[:i])) or "the recipe"
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise fail(f"{path} is a list of {len(node)}; no item {show(part)}")
            elif isinstance(node, dict):
                if isinstance(part, int):
                    raise fail(f"{path} is a mapping, not a list; use .name, not [{part}]")
                if not last and node.get(part) is None:
                    node[part] = [] if isinstance(parts[i + 1], int) else {}
            else:
                raise fail(f"{path} is {show(node)}, which has no fields")
            if last:
                node[part] = value
            else:
                node = node[part]
    return data


def load_recipe_data(path: Path) -> dict[str, Any]:
    """A recipe file's data: at most 1 MiB of UTF-8 YAML, no aliases, a mapping at the top."""
    path = Path(path)

    def fail(message: str) -> RecipeError:
        return RecipeError([FieldError("", message)], source=str(path))

    if not path.is_file():
        raise fail(f"recipe file not found: {path}")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise fail(f"{size} bytes; a recipe is a YAML file of at most {MAX_RECIPE_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte {exc.start}); a recipe is a YAML file") from None
    try:
        data = parse_yaml(text)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if not isinstance(data, dict):
        raise fail(f"expected a mapping at the top level of the recipe, got {show(data)}")
    return data


def validate_recipe(data: dict[str, Any], base_dir: Path = Path("."), source: str = "recipe",
                    pm: PluginManager | None = None) -> Recipe:
    """Schema and plugin checks; all problems are collected before raising one RecipeError."""
    pm = pm or get_plugin_manager()
    token = _base_dir.set(Path(base_dir))
    errors: list[FieldError] = []
    recipe = None
    try:
        model = recipe_model(pm)
        try:
            recipe = model.model_validate(data)
        except ValidationError as exc:
            errors += _pydantic_errors(exc, (), model, pm)
        resolved: dict[str, Any] = {}
        if recipe is not None:
            errors += _check_plugins(recipe.model, recipe.stages, pm, resolved)
            recipe._resolved = resolved
            errors += _geometry_errors(recipe) + _model_file_errors(recipe)
            errors += [FieldError(f"stages[{i}]", msg) for i, s in enumerate(recipe.stages)
                       for msg in getattr(s, "check", lambda r: [])(recipe)]
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
    data = apply_overrides(load_recipe_data(path), overrides or [], source=str(path), pm=pm)
    return validate_recipe(data, base_dir=path.parent, source=str(path), pm=pm)

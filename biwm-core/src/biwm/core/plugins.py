"""The plugin manager and the per-kind registries.

Entry points in group ``biwm`` are loaded lazily, once, on the first registry lookup; then
core's built-in module is registered the same way (it is just another hookimpl module). Each
kind's registry is built on its first lookup, so ``biwm --help`` (commands only) calls no other
kind's hook and imports nothing those hooks import. A plugin that fails to import, or whose
registration hook raises (a factory that cannot be called as the protocols say, a compressor
that is not an ``nn.Module``, a stage runner that is neither callable nor ``"module:function"``),
is recorded as broken and the rest keep working. ``BIWM_DISABLE_PLUGINS=a,b`` blocks plugin
modules by entry-point name (``compressors``) and single plugins by name (``framepack``); a name
that is neither is warned about.

Every options model is registered as a subclass that forbids unknown fields and out-of-range
numbers (:func:`biwm.core.config.range_checked`), whatever the plugin declared. A stage's config
model is the options of kind ``stage`` (its factory is the stage's runner): it is kept as it is
when it derives from :class:`biwm.core.config.Strict`, and gets a ``stage: Literal[name]`` field
(the tag a recipe's ``stages:`` item is picked by) when it has none. A dataset's options model is
tagged the same way, by ``source: Literal[name]`` (what a recipe's ``data.source`` picks).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import traceback
import typing
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Literal

import pluggy
from pydantic import BaseModel, ConfigDict, create_model

from biwm.core import hookspecs
from biwm.core.config import Strict, range_checked

KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "control": "register_controls",
    "compressor": "register_compressors",
    "loss": "register_losses",
    "quantizer": "register_quantizers",
    "dataset": "register_datasets",
    "stage": "register_stages",
    "command": "register_commands",
}
BUILTIN_MODULES = {"core": "biwm.core.builtins"}
# Kinds whose factories are called as factory(options, backbone=...); the others as factory(options).
WITH_BACKBONE = ("control", "compressor", "loss")
# Kinds whose options models carry the tag a recipe picks them by: stage (``stages[i].stage``) and
# dataset (``data.source``).
TAGS = {"stage": "stage", "dataset": "source"}
DISABLE_ENV = "BIWM_DISABLE_PLUGINS"
LAZY_OBJECT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # "module:function", imported when first used


class NoOptions(BaseModel):
    """Options model for plugins that take none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PluginSpec:
    """One registered thing: a backbone, a control injector, a compressor, ..."""

    kind: str
    name: str
    factory: Callable[..., Any] | str  # a stage's runner may be a lazy "module:function"
    options: type[BaseModel]
    description: str
    plugin: str
    distribution: str
    version: str

    def create(self, options: dict[str, Any] | BaseModel | None = None, **context: Any) -> Any:
        if not isinstance(options, BaseModel):
            options = self.options.model_validate(options or {})
        made = self.factory(options, **context)
        if self.kind == "compressor":
            _require_module(self.name, type(made), self.plugin)
        return made

    def load(self) -> Callable[..., Any]:
        """The factory (a stage's runner) itself: a lazy ``"module:function"`` is imported now."""
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attribute = self.factory.partition(":")
        try:
            target: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"{self.kind} {self.name!r} of plugin {self.plugin!r}: cannot import "
                              f"{self.factory!r} ({type(exc).__name__}: {exc})") from exc
        return target


def _require_module(name: str, made: type, plugin: str) -> None:
    from torch import nn

    if not issubclass(made, nn.Module):
        raise TypeError(f"compressor {name!r} of plugin {plugin!r} is a {made.__name__}, not a torch.nn.Module; "
                        "a compressor must be one (its parameters train and save with the model)")


def _check_factory(kind: str, name: str, factory: Callable[..., Any] | str, plugin: str) -> None:
    """The factory must take what the registry passes: (options), (options, backbone=...), or for a
    stage's runner (ctx, config, stage_dir); a stage's runner may also be a lazy "module:function"."""
    if kind == "stage" and isinstance(factory, str):
        if not LAZY_OBJECT.fullmatch(factory):
            raise TypeError(f"stage {name!r}: runner {factory!r} is neither callable nor a 'module:function' string")
        return  # imported when the stage runs
    if not callable(factory):
        raise TypeError(f"{kind} {name!r}: factory {factory!r} is not callable")
    if kind == "command":
        return  # a typer command function or Typer group: the CLI calls it with its own parameters
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check here
    args, kwargs, call = (((None, None, None), {}, "runner(ctx, config, stage_dir)") if kind == "stage" else
                          ((None,), {"backbone": None}, "factory(options, backbone=...)") if kind in WITH_BACKBONE
                          else ((None,), {}, "factory(options)"))
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{kind} {name!r}: {getattr(factory, '__name__', factory)}{signature} cannot be called as "
                        f"{call} ({exc})") from None
    if kind == "compressor" and isinstance(factory, type):
        _require_module(name, factory, plugin)


def _tagged_config(kind: str, name: str, config: type[BaseModel]) -> type[BaseModel]:
    """A stage's config (a dataset's options) as recipes validate it: tagged by a ``stage:
    Literal[name]`` (``source: Literal[name]``) field, added when the class has none, and
    range-checked unless it is a :class:`Strict` model already."""
    field_name = TAGS[kind]
    tag = config.model_fields.get(field_name)
    if tag is None:
        config = create_model(config.__name__, __base__=config, __module__=config.__module__,
                              __doc__=config.__doc__, **{field_name: (Literal[name], name)})
    elif typing.get_origin(tag.annotation) is not Literal or typing.get_args(tag.annotation) != (name,):
        raise TypeError(f"{kind} {name!r}: {config.__name__}.{field_name} must be Literal[{name!r}] (a recipe "
                        f"picks the {kind} by it), not {tag.annotation!r}")
    if issubclass(config, Strict) and config.model_config.get("extra") == "forbid":
        return config
    return range_checked(config)


def _is_group(command: Any) -> bool:
    import typer

    return isinstance(command, typer.Typer)


def _merged_groups(first: PluginSpec, group: Any, description: str, status: "PluginStatus") -> PluginSpec:
    """Two plugins that register a command group under one name (``biwm data``) share it: one group
    with the subcommands of both. A subcommand name the first already has is left out, with a
    warning naming both plugins."""
    import typer

    merged = typer.Typer(help=first.factory.info.help, no_args_is_help=True)
    merged.registered_commands = list(first.factory.registered_commands)
    merged.registered_groups = list(first.factory.registered_groups)
    taken = {_subcommand_name(c) for c in merged.registered_commands} | {_group_name(g) for g in merged.registered_groups}
    for items, name_of in ((group.registered_commands, _subcommand_name), (group.registered_groups, _group_name)):
        kept = merged.registered_commands if items is group.registered_commands else merged.registered_groups
        for item in items:
            if name_of(item) in taken:
                warnings.warn(f"plugin {status.name!r} ({status.distribution}) registers command '{first.name} "
                              f"{name_of(item)}', which plugin {first.plugin!r} already has; left out", stacklevel=1)
                continue
            taken.add(name_of(item))
            kept.append(item)
    return PluginSpec("command", first.name, merged, first.options, "; ".join(d for d in (first.description,
                      description) if d), f"{first.plugin}, {status.name}", f"{first.distribution}, {status.distribution}",
                      f"{first.version}, {status.version}")


def _subcommand_name(command: Any) -> str:
    return command.name or command.callback.__name__.replace("_", "-")


def _group_name(group: Any) -> str:
    return group.name


@dataclass
class PluginStatus:
    """Load status of one plugin module (an entry point or a built-in)."""

    name: str
    distribution: str
    version: str
    status: str  # "ok" | "broken" | "disabled"
    error: str = ""
    provides: list[tuple[str, str]] = field(default_factory=list)


class UnknownPluginError(KeyError):
    def __init__(self, kind: str, name: str, allowed: list[str]):
        self.kind, self.name, self.allowed = kind, name, allowed
        super().__init__(f"unknown {kind} {name!r}; allowed: {', '.join(allowed) or '(none installed)'}")

    def __str__(self) -> str:
        return self.args[0]


def _dist_version(dist_name: str) -> str:
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _short_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


class PluginManager:
    def __init__(self) -> None:
        self._pm = pluggy.PluginManager("biwm")
        self._pm.add_hookspecs(hookspecs)
        self._loaded = False
        self._statuses: dict[str, PluginStatus] = {}
        self._registries: dict[str, dict[str, PluginSpec]] = {}  # per kind, built on its first lookup
        self._disabled_items: list[tuple[str, str, PluginStatus]] = []  # (kind, name, module) blocked by name

    def _disabled(self) -> set[str]:
        return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}

    def disabled_names(self) -> set[str]:
        """Names in BIWM_DISABLE_PLUGINS."""
        return self._disabled()

    def unknown_disabled(self) -> list[str]:
        """Names in BIWM_DISABLE_PLUGINS that are neither a plugin module nor a plugin."""
        self.statuses()
        known = set(self._statuses) | {name for _, name, _ in self._disabled_items}
        return sorted(self._disabled() - known)

    def disabled_items(self) -> list[tuple[str, str, PluginStatus]]:
        """(kind, name, providing module) of single plugins blocked by name."""
        self.statuses()
        return list(self._disabled_items)

    def load(self) -> None:
        """Import entry points and built-ins once; idempotent."""
        if self._loaded:
            return
        self._loaded = True
        disabled = self._disabled()
        for ep in metadata.entry_points(group="biwm"):
            dist = ep.dist.name if ep.dist else "unknown"
            version = ep.dist.version if ep.dist else "unknown"
            if ep.name in disabled:
                self._statuses[ep.name] = PluginStatus(ep.name, dist, version, "disabled", f"blocked by {DISABLE_ENV}")
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._statuses[ep.name] = PluginStatus(ep.name, dist, version, "broken", _short_error(exc))
                continue
            self._register_module(ep.name, module, dist, version)
        for name, module_path in BUILTIN_MODULES.items():
            if name in disabled:
                self._statuses[name] = PluginStatus(name, "biwm-core", _dist_version("biwm-core"), "disabled")
                continue
            self._register_module(name, importlib.import_module(module_path), "biwm-core", _dist_version("biwm-core"))

    def _register_module(self, name: str, module: Any, dist: str, version: str) -> None:
        if self._pm.is_registered(module) or self._pm.get_plugin(name) is not None:
            return
        self._pm.register(module, name=name)
        self._statuses[name] = PluginStatus(name, dist, version, "ok")

    def _build_registry(self, kind: str) -> dict[str, PluginSpec]:
        self.load()
        registry: dict[str, PluginSpec] = {}
        disabled = self._disabled()
        for impl in getattr(self._pm.hook, KINDS[kind]).get_hookimpls():
            status = self._statuses[impl.plugin_name]

            def add(name: str, factory: Callable[..., Any] | str, options: type[BaseModel], description: str,
                    _status: PluginStatus = status) -> None:
                if name in registry and kind == "command" and _is_group(factory) and _is_group(registry[name].factory):
                    registry[name] = _merged_groups(registry[name], factory, description, _status)
                    _status.provides.append((kind, name))
                    return
                if name in registry:
                    raise ValueError(f"{kind} {name!r} is registered by both {registry[name].plugin!r} and "
                                     f"{_status.name!r}")
                if not (isinstance(options, type) and issubclass(options, BaseModel)):
                    what = "config" if kind == "stage" else "options"
                    raise TypeError(f"{kind} {name!r}: {what} must be a pydantic BaseModel class, got {options!r}")
                _check_factory(kind, name, factory, _status.name)
                if name in disabled:
                    self._disabled_items.append((kind, name, _status))
                    return
                options = _tagged_config(kind, name, options) if kind in TAGS else range_checked(options)
                registry[name] = PluginSpec(kind, name, factory, options, description, _status.name,
                                            _status.distribution, _status.version)
                _status.provides.append((kind, name))

            def register(name: str, factory: Callable[..., Any], options: type[BaseModel] = NoOptions,
                         description: str = "") -> None:
                add(name, factory, options, description)

            def register_stage(name: str, config: type[BaseModel], runner: Callable[..., Any] | str,
                               description: str = "") -> None:
                add(name, runner, config, description)

            try:
                impl.function(register=register_stage if kind == "stage" else register)
            except Exception as exc:
                status.status, status.error = "broken", _short_error(exc)
        return registry

    def registry(self, kind: str) -> dict[str, PluginSpec]:
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; allowed: {', '.join(KINDS)}")
        if kind not in self._registries:
            self._registries[kind] = self._build_registry(kind)
        return self._registries[kind]

    def get(self, kind: str, name: str) -> PluginSpec:
        reg = self.registry(kind)
        if name not in reg:
            raise UnknownPluginError(kind, name, sorted(reg))
        return reg[name]

    def create(self, kind: str, name: str, options: dict[str, Any] | BaseModel | None = None, **context: Any) -> Any:
        return self.get(kind, name).create(options, **context)

    def statuses(self) -> list[PluginStatus]:
        for kind in KINDS:
            self.registry(kind)
        return list(self._statuses.values())


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_plugin_manager() -> None:
    """Forget loaded plugins (tests; after changing BIWM_DISABLE_PLUGINS)."""
    global _manager
    _manager = None

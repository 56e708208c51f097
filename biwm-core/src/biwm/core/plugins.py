"""The plugin manager and the per-kind registries.

Entry points in group ``biwm`` are loaded lazily, once, on the first registry lookup; then
core's built-in module is registered the same way (it is just another hookimpl module). A
plugin that fails to import, or whose registration hook raises (a factory that cannot be called
as the protocols say, a compressor that is not an ``nn.Module``), is recorded as broken and the
rest keep working. ``BIWM_DISABLE_PLUGINS=a,b`` blocks plugin modules by entry-point name
(``compressors``) and single plugins by name (``framepack``); a name that is neither is warned about.

Every options model is registered as a subclass that forbids unknown fields and out-of-range
numbers (:func:`biwm.core.config.range_checked`), whatever the plugin declared.
"""

from __future__ import annotations

import importlib
import inspect
import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy
from pydantic import BaseModel, ConfigDict

from biwm.core import hookspecs
from biwm.core.config import range_checked

KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "control": "register_controls",
    "compressor": "register_compressors",
    "loss": "register_losses",
    "quantizer": "register_quantizers",
    "command": "register_commands",
}
BUILTIN_MODULES = {"core": "biwm.core.builtins"}
# Kinds whose factories are called as factory(options, backbone=...); the others as factory(options).
WITH_BACKBONE = ("control", "compressor", "loss")
DISABLE_ENV = "BIWM_DISABLE_PLUGINS"


class NoOptions(BaseModel):
    """Options model for plugins that take none."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PluginSpec:
    """One registered thing: a backbone, a control injector, a compressor, ..."""

    kind: str
    name: str
    factory: Callable[..., Any]
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


def _require_module(name: str, made: type, plugin: str) -> None:
    from torch import nn

    if not issubclass(made, nn.Module):
        raise TypeError(f"compressor {name!r} of plugin {plugin!r} is a {made.__name__}, not a torch.nn.Module; "
                        "a compressor must be one (its parameters train and save with the model)")


def _check_factory(kind: str, name: str, factory: Callable[..., Any], plugin: str) -> None:
    """The factory must take what the registry passes: (options) or (options, backbone=...)."""
    if not callable(factory):
        raise TypeError(f"{kind} {name!r}: factory {factory!r} is not callable")
    if kind == "command":
        return  # a typer command function or Typer group: the CLI calls it with its own parameters
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check here
    try:
        signature.bind(None, **({"backbone": None} if kind in WITH_BACKBONE else {}))
    except TypeError as exc:
        call = "factory(options, backbone=...)" if kind in WITH_BACKBONE else "factory(options)"
        raise TypeError(f"{kind} {name!r}: {getattr(factory, '__name__', factory)}{signature} cannot be called as "
                        f"{call} ({exc})") from None
    if kind == "compressor" and isinstance(factory, type):
        _require_module(name, factory, plugin)


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
        self._registries: dict[str, dict[str, PluginSpec]] | None = None
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

    def _build_registries(self) -> dict[str, dict[str, PluginSpec]]:
        self.load()
        registries: dict[str, dict[str, PluginSpec]] = {kind: {} for kind in KINDS}
        disabled = self._disabled()
        for kind, hook_name in KINDS.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                status = self._statuses[impl.plugin_name]

                def register(name: str, factory: Callable[..., Any], options: type[BaseModel] = NoOptions,
                             description: str = "", *, _kind: str = kind, _status: PluginStatus = status) -> None:
                    if name in registries[_kind]:
                        other = registries[_kind][name].plugin
                        raise ValueError(f"{_kind} {name!r} is registered by both {other!r} and {_status.name!r}")
                    if not (isinstance(options, type) and issubclass(options, BaseModel)):
                        raise TypeError(f"{_kind} {name!r}: options must be a pydantic BaseModel class, got {options!r}")
                    _check_factory(_kind, name, factory, _status.name)
                    if name in disabled:
                        self._disabled_items.append((_kind, name, _status))
                        return
                    registries[_kind][name] = PluginSpec(_kind, name, factory, range_checked(options), description,
                                                         _status.name, _status.distribution, _status.version)
                    _status.provides.append((_kind, name))

                try:
                    impl.function(register=register)
                except Exception as exc:
                    status.status, status.error = "broken", _short_error(exc)
        return registries

    def registry(self, kind: str) -> dict[str, PluginSpec]:
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; allowed: {', '.join(KINDS)}")
        if self._registries is None:
            self._registries = self._build_registries()
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

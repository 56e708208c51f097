"""BiWM core: protocols, plugins, recipes, CLI, toy world, window/rollout engine and stages."""

from biwm.core.hookspecs import hookimpl

__all__ = ["hookimpl"]

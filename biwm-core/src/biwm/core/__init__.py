"""BiWM core: protocols, plugins, recipes, CLI, window/rollout engine and stages (the toy world is biwm-toyworld)."""

from biwm.core.hookspecs import hookimpl

__all__ = ["hookimpl", "load"]


def load(path, device="cpu"):
    """A saved model ready to sample: ``(world_model, sampler)``. ``path`` is a model file that
    carries its card (every model BiWM's training stages write), a folder holding one, or a run,
    stage or checkpoint folder. See :func:`biwm.core.loading.load_model`."""
    from biwm.core.loading import load_model

    return load_model(path, device)

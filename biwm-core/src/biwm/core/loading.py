"""``biwm.core.load``: a saved model, ready to sample, from its file alone (its model card) or from
the run it belongs to (its recipe.yaml)."""

from __future__ import annotations

from pathlib import Path

import torch

from biwm.core.sampling import Sampler  # noqa: F401 (the type load_model returns)
from biwm.core.window import WorldModel


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[WorldModel, Sampler]:
    """(world model in eval mode on ``device``, its sampler) for ``path``: a model file with a card,
    a folder holding one, or a run, stage or checkpoint folder (as ``biwm eval`` takes). A distilled
    generator samples with its own few steps; any other model with the evaluate settings it was made
    with (20 Euler steps, shift 3, no guidance unless its run says otherwise)."""
    world, sampler, _, _ = load_run_model(path, device)
    return world, sampler


def load_run_model(path: str | Path, device: torch.device | str = "cpu"):
    """:func:`load_model`'s world model and sampler, with the ``RunContext`` of the recipe they come
    from (one ``evaluate`` stage: its dataset and settings) and the weights file."""
    from rich.console import Console

    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext, evaluation_recipe_data, find_run
    from biwm.core.stages.common import load_world_model, sampler_for

    run_dir, weights = find_run(Path(path))
    recipe = validate_recipe(evaluation_recipe_data(run_dir, weights), base_dir=run_dir, source=str(weights))
    ctx = RunContext(recipe=recipe, run_dir=run_dir, console=Console(quiet=True))
    world = load_world_model(ctx, init=weights, report=False).to(device).eval()
    evaluate = recipe.stages[0]
    sampler = sampler_for(ctx, weights, evaluate.steps, evaluate.shift, evaluate.cfg_scale, evaluate.history_sigma)
    return world, sampler, ctx, weights

"""Stage ``export``: write the trained transformer as a diffusers-format folder (``save_pretrained``),
so it loads anywhere diffusers does, including as ``weights:`` of a later recipe.

A diffusers folder holds the transformer only. The BiWM parts trained with it (the controls and
the history compressor) are written beside it, to ``biwm_parts.safetensors`` in the stage folder,
and the stage says so: a later recipe keeps them with ``init:`` that file (or the training stage's
``model.safetensors``), and starts them from zero without it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from biwm.core.config import Strict, show

PARTS_FILE = "biwm_parts.safetensors"
_RESERVED = {"metrics.json", "stage.yaml", "DONE", "checkpoints", PARTS_FILE}


class ExportConfig(Strict):
    stage: Literal["export"] = "export"
    folder: str = Field("transformer", description="name of the folder to write, inside the stage folder "
                                                   "(a plain name: no '/', '..' or absolute path)")

    @field_validator("folder")
    @classmethod
    def _inside_stage_folder(cls, value: str) -> str:
        """The stage replaces this folder, so it must be one the stage owns: a plain name."""
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", value) or value in (".", "..") or value in _RESERVED:
            raise ValueError(f"{show(value)} is not a plain folder name; the export is written inside the stage "
                             "folder, so give a name like 'transformer' (letters, digits, '_', '-', '.'; no "
                             f"'/', '..' or absolute path; not {', '.join(sorted(_RESERVED))})")
        return value


def run(ctx, cfg: ExportConfig, stage_dir: Path) -> dict:
    from biwm.core.checkpoint import atomic_folder, module_state, save_weights
    from biwm.core.stages.common import load_world_model

    if ctx.previous_weights is None:
        raise ValueError("stage export needs an earlier training stage in the recipe")
    world = load_world_model(ctx)
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / cfg.folder
    with atomic_folder(final) as tmp:
        world.backbone.trainable().save_pretrained(tmp, safe_serialization=True)
    parts = {"controls": world.controls, "compressor": world.compressor}
    tensors = module_state(parts)
    save_weights(stage_dir / PARTS_FILE, parts, {"stage": "export", "source": str(ctx.previous_weights)})
    recipe = ctx.recipe
    left_out = [f"controls ({', '.join(c.name for c in recipe.model.controls) or 'none'})",
                f"compressor ({recipe.model.compressor.name})"]
    ctx.console.print(f"exported the transformer to {final} (diffusers format). Not in it: the {' and the '.join(left_out)}"
                      f", {len(tensors)} tensors, written to {stage_dir / PARTS_FILE}; a recipe that uses the "
                      f"export as weights: keeps them only with init: {stage_dir / PARTS_FILE} (without it they "
                      "start from zero)", highlight=False)
    return {"exported_to": str(final), "biwm_parts": str(stage_dir / PARTS_FILE),
            "left_out_of_diffusers_folder": left_out, "biwm_parts_tensors": len(tensors)}

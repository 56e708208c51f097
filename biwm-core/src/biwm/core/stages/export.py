"""Stage ``export``: write the trained transformer as a diffusers-format folder (``save_pretrained``),
so it loads anywhere diffusers does, including as ``weights:`` of a later recipe.

A diffusers folder holds the transformer only. The BiWM parts trained with it (the controls and
the history compressor) are written beside it, to ``biwm_parts.safetensors`` in the stage folder,
and the stage says so: a later recipe keeps them with ``init:`` that file (or the training stage's
``model.safetensors``), and starts them from zero without it. The model's card (what the backbone,
controls, compressor, data and sampler are) goes to ``biwm_card.json`` beside them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from biwm.core.config import Strict, show

PARTS_FILE = "biwm_parts.safetensors"
CARD_FILE = "biwm_card.json"
_RESERVED = {"metrics.json", "stage.yaml", "DONE", "checkpoints", PARTS_FILE, CARD_FILE}


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
    import json

    from biwm.core.checkpoint import atomic_folder, atomic_path, module_state, save_weights
    from biwm.core.stages.common import CARD_KEY, load_world_model, model_card, read_card

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
    # the card of the exported model (backbone and options, controls, compressor, data, sampler), beside it
    source_card = read_card(Path(ctx.previous_weights))
    card = source_card if source_card is not None else json.loads(model_card(ctx, "export")[CARD_KEY])
    card = {**card, "export": {"transformer": cfg.folder, "parts": PARTS_FILE, "source": str(ctx.previous_weights)}}
    with atomic_path(stage_dir / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    recipe = ctx.recipe
    left_out = [f"controls ({', '.join(c.name for c in recipe.model.controls) or 'none'})",
                f"compressor ({recipe.model.compressor.name})"]
    ctx.console.print(f"exported the transformer to {final} (diffusers format). Not in it: the {' and the '.join(left_out)}"
                      f", {len(tensors)} tensors, written to {stage_dir / PARTS_FILE}; a recipe that uses the "
                      f"export as weights: keeps them only with init: {stage_dir / PARTS_FILE} (without it they "
                      "start from zero)", highlight=False)
    ctx.console.print(f"model card (backbone, controls, compressor, data, sampler): {stage_dir / CARD_FILE}",
                      highlight=False)
    return {"exported_to": str(final), "biwm_parts": str(stage_dir / PARTS_FILE), "card": str(stage_dir / CARD_FILE),
            "left_out_of_diffusers_folder": left_out, "biwm_parts_tensors": len(tensors)}

"""Stage ``export``: write the trained transformer as a diffusers-format folder (``save_pretrained``),
so it loads anywhere diffusers does, including as ``weights:`` of a later recipe."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from biwm.core.config import Strict


class ExportConfig(Strict):
    stage: Literal["export"] = "export"
    folder: str = Field("transformer", description="subfolder of the stage folder to write")


def run(ctx, cfg: ExportConfig, stage_dir: Path) -> dict:
    from biwm.core.stages.common import load_world_model

    if ctx.previous_weights is None:
        raise ValueError("stage export needs an earlier training stage in the recipe")
    world = load_world_model(ctx)
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / cfg.folder
    tmp = Path(tempfile.mkdtemp(dir=stage_dir, prefix=".tmp-export-"))
    tmp.chmod(0o755)
    try:
        world.backbone.trainable().save_pretrained(tmp, safe_serialization=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ctx.console.print(f"exported transformer to {final}")
    return {"exported_to": str(final)}

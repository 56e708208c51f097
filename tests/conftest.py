import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test sees a freshly loaded plugin manager (environment changes take effect)."""
    from biwm.core.plugins import reset_plugin_manager

    monkeypatch.delenv("BIWM_DISABLE_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def tiny_recipe(run_dir: Path, **stage_overrides) -> dict:
    """A CPU-second-sized recipe: 32x32 toy world, tiny Wan with 2 layers."""
    finetune = {"stage": "finetune", "steps": 4, "batch_size": 2, "checkpoint_every": 2, "chunk_frames": 2,
                "max_history": 4, "lr": 1e-3, **stage_overrides.pop("finetune", {})}
    generate = {"stage": "generate", "trajectories": 2, "history_frames": 2, "chunks": 2, "chunk_frames": 2,
                "steps": 2, **stage_overrides.pop("generate", {})}
    return {
        "name": "tiny-test",
        "run_dir": str(run_dir),
        "data": {"train_clips": 8, "heldout_clips": 2, "frames": 8,
                 "toyworld": {"height": 32, "width": 32}},
        "model": {"backbone": {"name": "wan", "options": {"preset": "tiny", "overrides": {"num_layers": 2}}},
                  "controls": ["actions", "plucker"],
                  "compressor": {"name": "none", "options": {"max_frames": 4}}},
        "stages": [finetune, generate],
    }


def tiny_model_file(tmp_path: Path) -> Path:
    """The model.safetensors (with its card) of a tiny run's finetune stage, trained a few steps."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    data = tiny_recipe(tmp_path / "run")
    data["stages"] = data["stages"][:1]
    run_recipe(validate_recipe(data))
    return tmp_path / "run" / "finetune" / "model.safetensors"


def biwm_cmd() -> list[str]:
    return [sys.executable, "-m", "biwm.core.cli"]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env

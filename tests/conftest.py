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


def image_shift(before, after) -> tuple[int, int]:
    """(dy, dx) pixels by which the content of ``after`` [H, W] moved relative to ``before``: the peak of
    their phase correlation (positive dx: moved right)."""
    import numpy as np

    a, b = (np.asarray(x, dtype=np.float64) for x in (before, after))
    cross = np.fft.fft2(b - b.mean()) * np.conj(np.fft.fft2(a - a.mean()))
    correlation = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    peak = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
    return tuple(int(p if p <= n // 2 else p - n) for p, n in zip(peak, correlation.shape))


def true_turn_shift(scene: int, history_frames: int, keys: str) -> list[tuple[int, int]]:
    """The toy world's own answer: image shifts between consecutive frames of held-out scene ``scene``
    when ``keys`` continue its ``history_frames`` true frames (as biwm generate / play start it)."""
    from biwm.core.camera import actions_to_poses, parse_keys
    from biwm.toyworld.world import render_clips, split_seeds

    seeds = split_seeds("heldout", 1, scene)
    history = render_clips(seeds, history_frames)
    future = actions_to_poses(parse_keys(keys)[None], history.camera.c2w[:, -1])
    clips = render_clips(seeds, history_frames + future.shape[1], c2w=torch.cat([history.camera.c2w, future], 1))
    gray = clips.frames[0].float().mean(1)
    return [image_shift(gray[i], gray[i + 1]) for i in range(history_frames - 1, gray.shape[0] - 1)]

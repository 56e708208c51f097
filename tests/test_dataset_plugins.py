"""Data as a plugin kind: a distribution outside the repo registers a dataset (a ClipSource)
through its entry point, and a recipe's stages train and roll out on it with no change to core;
``data.source`` picks it, its options model validates ``data:``; the toy world is biwm-toyworld's
dataset (the default) and gives exactly the clips it gave before; without biwm-toyworld a recipe
that needs it says to install it."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from rich.console import Console

from conftest import biwm_cmd, subprocess_env, tiny_recipe
from test_plugins import make_distribution
from test_stage_plugins import recipe_errors

PLUGIN = """
    import torch
    from pydantic import BaseModel, Field
    from biwm.core import hookimpl
    from biwm.core.camera import CameraTrack
    from biwm.core.data import LatentClips, latent_aligned_camera, video_frames_for

    CALLS = []  # (split, count, latent_frames, keep_frames, start) of every latents() call

    class SynthOptions(BaseModel):
        '''No `source` field: the registry adds source: Literal["synth"].'''
        train_clips: int = Field(4, ge=1)
        frames: int = Field(8, ge=2)
        prompt: str = "noise"
        height: int = Field(32, ge=8)
        width: int = Field(32, ge=8)

    class Synth:
        '''Random latents, cameras drifting forward, random actions: a ClipSource in 20 lines.'''

        def __init__(self, options):
            self.options = options
            self.prompt, self.train_clips, self.frames = options.prompt, options.train_clips, options.frames

        def latents(self, split, count, latent_frames, backbone, cache_dir, cache_key, device="cpu",
                    keep_frames=False, start=0):
            CALLS.append((split, count, latent_frames, keep_frames, start))
            g = torch.Generator().manual_seed((split == "heldout") * 1000 + start)
            tf, sf = backbone.temporal_factor, backbone.spatial_factor
            frames = video_frames_for(latent_frames, tf)
            h, w = self.options.height, self.options.width
            latents = torch.randn(count, backbone.latent_channels, latent_frames, h // sf, w // sf, generator=g)
            c2w = torch.eye(4).repeat(count, frames, 1, 1)
            c2w[:, :, 2, 3] = torch.arange(frames) * 0.1
            intrinsics = torch.tensor([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]]).repeat(count, 1, 1)
            actions = torch.randint(0, 81, (count, frames), generator=g)
            camera = latent_aligned_camera(CameraTrack(c2w, intrinsics, actions), tf)
            video = torch.randint(0, 256, (count, frames, 3, h, w), generator=g, dtype=torch.uint8)
            return LatentClips(latents, camera, video if keep_frames else None, list(range(start, start + count)))

    @hookimpl
    def register_datasets(register):
        register("synth", Synth, options=SynthOptions, description="random latents and cameras (a test dataset)")
"""
MODULE = "biwm_synth_plugin"


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "biwm-synth", MODULE, PLUGIN, version="0.3.0")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(MODULE, None)


def synth_recipe(run_dir, **data) -> dict:
    recipe = tiny_recipe(run_dir, finetune={"steps": 2, "checkpoint_every": 1, "batch_size": 2},
                         generate={"chunks": 1, "steps": 1, "keys": "w*2"})
    recipe["data"] = {"source": "synth", "train_clips": 3, "frames": 8, "prompt": "static", **data}
    recipe["stages"].append({"stage": "evaluate", "trajectories": 2, "history_frames": 2, "chunks": 1,
                             "chunk_frames": 2, "steps": 1, "write_report": False})
    return recipe


def test_a_distribution_adds_a_dataset_that_the_stages_run_on(site, tmp_path):
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.protocols import ClipSource
    from biwm.core.recipe import dataset_for, validate_recipe
    from biwm.core.runner import run_recipe
    from biwm.core.stages.common import read_card

    spec = get_plugin_manager().get("dataset", "synth")
    assert (spec.plugin, spec.distribution, spec.version) == (MODULE, "biwm-synth", "0.3.0")
    recipe = validate_recipe(synth_recipe(tmp_path / "run"))
    assert isinstance(recipe.data, sys.modules[MODULE].SynthOptions)
    assert (recipe.data.source, recipe.data.train_clips, recipe.data.prompt) == ("synth", 3, "static")
    assert isinstance(dataset_for(recipe), ClipSource)

    console = Console(file=io.StringIO(), width=200)
    metrics = run_recipe(recipe, console=console)["stages"]
    calls = sys.modules[MODULE].CALLS
    # finetune read the training split (8 video frames = 2 latent frames of the tiny codec), generate
    # and evaluate the held-out one with ground-truth frames
    assert calls[0][:2] == ("train", 3) and calls[0][3:] == (False, 0)
    assert [c[0] for c in calls[1:]] == ["heldout", "heldout"] and all(c[3] for c in calls[1:])
    assert metrics["finetune"]["finetune_steps"] == 2 and math.isfinite(metrics["finetune"]["finetune_loss_last"])
    assert math.isfinite(metrics["generate"]["psnr_correct_actions"])
    assert "psnr_shuffled_actions" not in metrics["generate"] and "keys" not in metrics["generate"]
    assert math.isfinite(metrics["evaluate"]["psnr"]) and "idm_accuracy" not in metrics["evaluate"]
    assert "dynamics" not in metrics["evaluate"]
    said = " ".join(console.file.getvalue().split())
    assert "dataset synth has no action steps: no shuffled-actions baseline or keys rollout" in said
    assert "dataset synth adds no scores of its own: quality and drift only" in said

    snapshot = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert snapshot["data"] == {"train_clips": 3, "frames": 8, "prompt": "static", "height": 32, "width": 32,
                                "source": "synth"}
    assert validate_recipe(snapshot).data == recipe.data  # the snapshot reads back
    card = read_card(tmp_path / "run" / "finetune" / "model.safetensors")
    assert card["data"] == snapshot["data"]


def test_an_unknown_source_lists_the_known_ones(site, tmp_path):
    errors = recipe_errors(synth_recipe(tmp_path / "run", source="nope"))
    assert errors == ["data.source: unknown dataset 'nope'; allowed: synth, toyworld, videos"], errors


def test_a_bad_option_of_a_plugin_dataset_names_the_field(site, tmp_path):
    errors = recipe_errors(synth_recipe(tmp_path / "run", train_clips=0, heigth=16, toyworld={"height": 32}))
    assert any(e.startswith("data.train_clips: Input should be greater than or equal to 1 (got 0); expected int >= 1")
               for e in errors), errors
    assert "data.heigth: unknown field 'heigth'; allowed: train_clips, frames, prompt, height, width, source" in errors
    assert any(e.startswith("data.toyworld: unknown field 'toyworld'") for e in errors), errors


def test_a_disabled_toy_world_is_named_in_the_error(monkeypatch, tmp_path):
    from biwm.core.plugins import reset_plugin_manager

    monkeypatch.setenv("BIWM_DISABLE_PLUGINS", "toyworld")
    reset_plugin_manager()
    data = tiny_recipe(tmp_path / "run")
    del data["data"]  # no data at all: the toy world with its defaults, which is disabled here
    errors = recipe_errors(data)
    assert errors == ["data.source: unknown dataset 'toyworld'; allowed: videos; 'toyworld' is disabled "
                      "by BIWM_DISABLE_PLUGINS"]  # videos: biwm-data's, errors


@pytest.fixture
def no_toyworld(monkeypatch):
    """The plugin manager as it is where biwm-toyworld is not installed: its entry point is not there."""
    import types
    from importlib import metadata

    import biwm.core.plugins as plugins

    def entry_points(**select):
        return [ep for ep in metadata.entry_points(**select) if not (ep.dist and ep.dist.name == "biwm-toyworld")]

    monkeypatch.setattr(plugins, "metadata", types.SimpleNamespace(
        entry_points=entry_points, version=metadata.version, PackageNotFoundError=metadata.PackageNotFoundError))
    plugins.reset_plugin_manager()
    assert "toyworld" not in plugins.get_plugin_manager().registry("dataset")
    plugins.reset_plugin_manager()  # loaded afresh by the test (after any other fixture's sys.path change)


TOYWORLD_MISSING = ("data.source: unknown dataset 'toyworld'; allowed: {allowed}; dataset 'toyworld' (the data of a "
                    "recipe whose data: names no source) comes with biwm-toyworld: pip install biwm-toyworld")


def test_without_biwm_toyworld_a_recipe_of_the_toy_world_says_to_install_it(no_toyworld, tmp_path):
    data = tiny_recipe(tmp_path / "run")
    assert "source" not in data["data"]  # the toy world by default, as every recipe before datasets were plugins
    assert recipe_errors(data) == [TOYWORLD_MISSING.format(allowed="videos")]
    del data["data"]
    assert recipe_errors(data) == [TOYWORLD_MISSING.format(allowed="videos")]
    data["data"] = {"source": "toyworld", "frames": 8}
    assert recipe_errors(data) == [TOYWORLD_MISSING.format(allowed="videos")]

    from typer.testing import CliRunner

    from biwm.core.cli import app
    from conftest import ROOT

    result = CliRunner().invoke(app, ["validate", str(ROOT / "examples" / "quickstart.yaml")])
    assert result.exit_code == 2
    assert "data.source: unknown dataset 'toyworld'" in result.stderr
    assert "pip install biwm-toyworld" in " ".join(result.stderr.split())


def test_without_biwm_toyworld_other_datasets_still_validate(no_toyworld, site, tmp_path):
    from biwm.core.recipe import validate_recipe

    assert validate_recipe(synth_recipe(tmp_path / "run")).data.source == "synth"
    data = tiny_recipe(tmp_path / "run")
    assert recipe_errors(data) == [TOYWORLD_MISSING.format(allowed="synth, videos")]


def test_the_toy_world_dataset_gives_the_clips_toyworld_latents_gave(tmp_path):
    from biwm.toyworld.data import ToyWorldDataset, toyworld_latents
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext

    data = tiny_recipe(tmp_path / "run")
    recipe = validate_recipe(data)
    # a recipe written before datasets were plugins (no source) is the toy world, field for field
    assert recipe.snapshot()["data"] == {"source": "toyworld", **data["data"],
                                         "prompt": "", "toyworld": recipe.data.toyworld.model_dump(mode="json"),
                                         "still_fraction": 0.0}
    explicit = validate_recipe({**data, "data": {**data["data"], "source": "toyworld"}})
    assert explicit.data == recipe.data
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "run")
    dataset = ctx.dataset
    assert isinstance(dataset, ToyWorldDataset) and ctx.dataset is dataset
    assert (dataset.prompt, dataset.train_clips, dataset.frames) == ("", 8, 8)
    assert dataset.toyworld == recipe.data.toyworld
    backbone = ctx.build_world_model().backbone
    cache = tmp_path / "cache"
    for split, count, frames, keep, start in (("heldout", 2, 3, True, 0), ("train", 3, 2, False, 5)):
        direct = toyworld_latents(split, count, frames, recipe.data.toyworld, backbone, cache, "key",
                                  keep_frames=keep, start=start)
        files = sorted(cache.iterdir())
        for cache_dir in (None, cache):  # rendered afresh, and read from the cache the direct call wrote
            clips = dataset.latents(split, count, frames, backbone, cache_dir, "key", keep_frames=keep, start=start)
            assert torch.equal(clips.latents, direct.latents)
            assert torch.equal(clips.camera.c2w, direct.camera.c2w)
            assert torch.equal(clips.camera.intrinsics, direct.camera.intrinsics)
            assert torch.equal(clips.camera.actions, direct.camera.actions)
            assert (clips.frames is None) == (not keep) and (not keep or torch.equal(clips.frames, direct.frames))
            assert clips.seeds == direct.seeds
        assert sorted(cache.iterdir()) == files  # the same cache key: caches written before stay valid


def test_still_fraction_holds_the_camera_in_training_clips_only(tmp_path):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext
    from biwm.toyworld.world import still_stretches

    data = tiny_recipe(tmp_path / "run")
    plain = RunContext(recipe=validate_recipe(data), run_dir=tmp_path / "run")
    still = RunContext(recipe=validate_recipe({**data, "data": {**data["data"], "still_fraction": 0.5}}),
                       run_dir=tmp_path / "run")
    backbone = plain.build_world_model().backbone
    cache = tmp_path / "cache"
    a = plain.dataset.latents("train", 12, 3, backbone, cache, "key")
    b = still.dataset.latents("train", 12, 3, backbone, cache, "key")  # a cache key of its own, not a's file
    assert len(list(cache.iterdir())) == 2
    from biwm.core.data import video_frames_for

    mask = still_stretches(b.seeds, video_frames_for(3, backbone.temporal_factor), 0.5)
    chosen = mask.any(1)
    assert 0 < int(chosen.sum()) < 12
    video_actions = b.camera.actions[:, backbone.temporal_factor - 1:]  # latent-aligned: drop the repeats
    assert (video_actions[mask] == 0).all()
    assert torch.equal(b.camera.c2w[~chosen], a.camera.c2w[~chosen])  # the other clips are as before
    assert not torch.equal(b.latents[chosen], a.latents[chosen])
    held_plain = plain.dataset.latents("heldout", 4, 3, backbone, None, "key")
    held_still = still.dataset.latents("heldout", 4, 3, backbone, None, "key")
    assert torch.equal(held_plain.latents, held_still.latents)  # held-out clips never hold still
    errors = recipe_errors({**data, "data": {**data["data"], "still_fraction": 1.5}})
    assert any(e.startswith("data.still_fraction") for e in errors)


def test_list_plugins_shows_datasets(site, tmp_path):
    proc = subprocess.run(biwm_cmd() + ["list-plugins", "--json"], capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    assert rows[("dataset", "toyworld")]["distribution"] == "biwm-toyworld"
    assert rows[("dataset", "synth")]["distribution"] == "biwm-synth"
    assert rows[("dataset", "synth")]["description"] == "random latents and cameras (a test dataset)"

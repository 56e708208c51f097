"""biwm-data: the toy world written in each peer format (``biwm data toyworld --format``) imports
back to its true poses (1e-4) and action labels; bad media get an exit-2 error naming the file;
``--skip-bad`` imports the rest and reports; a failed import leaves nothing; a finetune from the
imported dataset reaches the toy world's own loss."""

from __future__ import annotations

import io
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from rich.console import Console

from conftest import biwm_cmd, subprocess_env, tiny_recipe

FORMATS = ("realestate10k", "poses", "keys", "biwm-actions")


def export(tmp_path, fmt, media="frames", clips=2, frames=9, **kw):
    from biwm.toyworld.export import write_formatted
    from biwm.toyworld.world import ToyWorldConfig

    out = tmp_path / f"{fmt}-{media}"
    write_formatted(out, fmt, clips, frames, ToyWorldConfig(height=32, width=32), media=media, **kw)
    return out


def do_import(source, out, fmt, **settings):
    from biwm.data.importer import ImportSettings, import_dataset

    defaults = {"fov_deg": 75.0} if fmt in ("keys", "biwm-actions") else {}
    if not any(p.suffix == ".mp4" for p in source.iterdir()):
        defaults["source_fps"] = 8.0
    return import_dataset(source, out, ImportSettings(format=fmt, **{**defaults, **settings}))


def truth(source):
    from biwm.core.checkpoint import load_tensors

    return load_tensors(source / "clips.safetensors")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("media", ["frames", "mp4"])
def test_every_format_round_trips_to_the_true_poses_and_actions(tmp_path, fmt, media):
    from biwm.data.store import clip_camera, read_clip

    source = export(tmp_path, fmt, media)
    manifest = do_import(source, tmp_path / "ds", fmt)
    true = truth(source)
    assert [c.name for c in manifest.clips] == ["clip0000", "clip0001"] and manifest.fps == 8.0
    for index, clip in enumerate(manifest.clips):
        assert clip.caption == "a toy room" and clip.frames == 9
        got = read_clip(tmp_path / "ds", clip.name)
        camera = clip_camera(got)
        c2w = camera.c2w[0]
        if fmt in ("keys", "biwm-actions"):  # no start pose in the file: the truth seen from its start
            c2w = true["start_c2w"][index] @ c2w
            assert torch.equal(got["actions"], true["actions"][index])
        else:  # frame 0 has no predecessor: idle
            assert got["actions"][0] == 0 and torch.equal(got["actions"][1:], true["actions"][index, 1:])
        torch.testing.assert_close(c2w, true["c2w"][index], atol=1e-4, rtol=0)
        torch.testing.assert_close(camera.intrinsics[0], true["intrinsics"][index], atol=1e-5, rtol=0)
        frames = got["frames"].float()
        if media == "frames":
            assert torch.equal(got["frames"], true["frames"][index])
        else:  # H.264 yuv420p is lossy: a mean error of a few grey levels
            assert (frames - true["frames"][index].float()).abs().mean() < 8.0


def test_lossless_mp4_keeps_every_pixel(tmp_path):
    from biwm.data.store import read_clip

    source = export(tmp_path, "poses", "mp4", clips=1, lossless=True)
    do_import(source, tmp_path / "ds", "poses")
    assert torch.equal(read_clip(tmp_path / "ds", "clip0000")["frames"], truth(source)["frames"][0])


def test_resampling_and_cutting_keep_poses_and_derive_actions(tmp_path):
    """Half the frame rate keeps every other frame (cut to 1 + 4k), and labels come from the poses."""
    from biwm.core.camera import poses_to_actions
    from biwm.data.store import read_clip

    source = export(tmp_path, "realestate10k", "mp4", clips=1, frames=17)
    manifest = do_import(source, tmp_path / "ds", "realestate10k", fps=4.0)
    got, true = read_clip(tmp_path / "ds", "clip0000"), truth(source)
    assert manifest.clips[0].frames == 9 and manifest.fps == 4.0
    torch.testing.assert_close(got["c2w"], true["c2w"][0, ::2], atol=1e-4, rtol=0)
    assert torch.equal(got["actions"], poses_to_actions(got["c2w"][None])[0])


def test_pose_files_in_other_conventions(tmp_path):
    """w2c matrices with normalised intrinsics, OpenGL axes, and a .npy without intrinsics."""
    from biwm.core.camera import invert_pose
    from biwm.data.store import clip_camera, read_clip

    source = export(tmp_path, "poses", clips=1)
    true = truth(source)
    c2w = true["c2w"][0].double()
    (source / "clip0000.npz").unlink()
    np.savez(source / "clip0000.npz", w2c=invert_pose(c2w).numpy(), K=true["intrinsics"][0].double().numpy())
    do_import(source, tmp_path / "a", "poses")
    torch.testing.assert_close(read_clip(tmp_path / "a", "clip0000")["c2w"], true["c2w"][0], atol=1e-4, rtol=0)
    (source / "clip0000.npz").unlink()
    np.save(source / "clip0000.npy", (c2w @ torch.diag(torch.tensor([1.0, -1, -1, 1]).double())).numpy())
    do_import(source, tmp_path / "b", "poses", convention="c2w", axes="opengl", fov_deg=75.0)
    camera = clip_camera(read_clip(tmp_path / "b", "clip0000"))
    torch.testing.assert_close(camera.c2w[0], true["c2w"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(camera.intrinsics[0], true["intrinsics"][0], atol=1e-5, rtol=0)


def test_key_strings_with_arrow_names(tmp_path):
    from biwm.core.camera import parse_keys
    from biwm.data.store import read_clip

    source = export(tmp_path, "keys", clips=1)
    (source / "clip0000.keys").write_text("w*3,a*2,up*2,wj,right")
    do_import(source, tmp_path / "ds", "keys")
    assert torch.equal(read_clip(tmp_path / "ds", "clip0000")["actions"], parse_keys("w*3,a*2,i*2,wj,l"))


# ----------------------------------------------------------------------------- bad media


def run_import(source, out, fmt="realestate10k", *extra):
    return subprocess.run(biwm_cmd() + ["data", "import", str(source), "--format", fmt, "--out", str(out),
                                        "--source-fps", "8", *extra],
                          capture_output=True, text=True, env=subprocess_env(COLUMNS="400"))


def _corrupt(source):
    (source / "clip0001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return source / "clip0001.mp4", "not a readable mp4 video"


def _truncated(source):
    data = (source / "clip0001.mp4").read_bytes()
    (source / "clip0001.mp4").write_bytes(data[: len(data) // 2])
    return source / "clip0001.mp4", "mp4"


def _pose_count(source):
    lines = (source / "clip0001.txt").read_text().splitlines()
    (source / "clip0001.txt").write_text("\n".join(lines[:-1]) + "\n")
    return source / "clip0001.txt", "8 poses for the 9 frames of clip0001.mp4; expected one per frame"


def _nan_pose(source):
    lines = (source / "clip0001.txt").read_text().splitlines()
    values = lines[3].split()
    values[10] = "nan"
    lines[3] = " ".join(values)
    (source / "clip0001.txt").write_text("\n".join(lines) + "\n")
    return source / "clip0001.txt", "frame 2: pose holds NaN or inf; expected finite numbers"


def _non_rigid(source):
    lines = (source / "clip0001.txt").read_text().splitlines()
    values = lines[4].split()
    values[7] = str(float(values[7]) * 1.5)
    lines[4] = " ".join(values)
    (source / "clip0001.txt").write_text("\n".join(lines) + "\n")
    return source / "clip0001.txt", "frame 3: pose is not rigid"


def _no_caption(source):
    (source / "captions.json").write_text(json.dumps({"clip0000": "a toy room"}))
    return source / "clip0001.mp4", f"no caption; expected an entry 'clip0001' in {source / 'captions.json'}"


BAD = {"corrupt mp4": _corrupt, "truncated mp4": _truncated, "pose count": _pose_count, "NaN pose": _nan_pose,
       "non-rigid pose": _non_rigid, "missing caption": _no_caption}


@pytest.fixture(scope="module")
def re10k_source(tmp_path_factory):
    return export(tmp_path_factory.mktemp("re10k"), "realestate10k", "mp4")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_media_is_an_error_naming_the_file(re10k_source, tmp_path, case):
    import shutil

    source = tmp_path / "src"
    shutil.copytree(re10k_source, source)
    file, expected = BAD[case](source)
    out = tmp_path / "ds"
    proc = run_import(source, out)
    said = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {file}" in said and expected in said, said
    assert not out.exists() and not list(tmp_path.glob(".*")), "a failed import must leave nothing"

    proc = run_import(source, out, "realestate10k", "--skip-bad")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "dataset.json").read_text())
    assert [c["name"] for c in manifest["clips"]] == ["clip0000"]
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["file"] for s in skipped] == [str(source / "clip0001.mp4")] and str(file) in skipped[0]["error"]


def test_an_existing_dataset_is_not_overwritten(re10k_source, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    proc = run_import(re10k_source, out)
    assert proc.returncode == 2 and "already exists" in proc.stderr


# ----------------------------------------------------------------------------- training


def test_finetune_from_imported_png_frames_matches_the_toy_world(tmp_path):
    """Same seed, same clips (PNG frames, so lossless), same prompt: the same losses."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    source = export(tmp_path, "poses", "frames", clips=9, frames=8)
    do_import(source, tmp_path / "ds", "poses", temporal_factor=1)  # the tiny codec's
    losses = {}
    for name, data in (("toyworld", None), ("videos", {"source": "videos", "path": str(tmp_path / "ds"),
                                                       "frames": 8, "heldout_clips": 1})):
        recipe = tiny_recipe(tmp_path / name, finetune={"steps": 6, "log_every": 1, "checkpoint_every": 6})
        recipe["stages"] = recipe["stages"][:1]
        recipe["data"]["prompt"] = "a toy room"
        if data:
            recipe["data"] = {**data, "prompt": "a toy room"}
        metrics = run_recipe(validate_recipe(recipe), console=Console(file=io.StringIO()))["stages"]["finetune"]
        losses[name] = (metrics["finetune_loss_first"], metrics["finetune_loss_last"])
    assert all(math.isfinite(v) for pair in losses.values() for v in pair)
    # frame 0's action differs (a pose file has no start pose: idle), nothing else
    assert losses["videos"] == pytest.approx(losses["toyworld"], rel=1e-3), losses


def test_inspect_summarises_and_previews(tmp_path):
    source = export(tmp_path, "keys", "frames", clips=2)
    do_import(source, tmp_path / "ds", "keys")
    proc = subprocess.run(biwm_cmd() + ["data", "inspect", str(tmp_path / "ds"), "--json"], capture_output=True,
                          text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    true = truth(source)["actions"]
    assert (summary["clips"], summary["frames"], summary["fps"]) == (2, 18, 8.0)
    assert summary["per_clip"][0]["resolution"] == "32x32"
    assert summary["actions"]["histogram"] == torch.bincount(true.flatten(), minlength=81).tolist()
    assert sorted(p.name for p in (tmp_path / "ds" / "inspect").iterdir()) == ["clip0000.mp4", "clip0001.mp4"]
    from biwm.data.media import read_video

    preview, fps = read_video(tmp_path / "ds" / "inspect" / "clip0000.mp4")
    assert preview.shape == (9, 128, 128, 3) and fps == 8.0


def test_cache_then_finetune_streams_from_it(tmp_path):
    """biwm data cache encodes every clip with the recipe's backbone (sharded safetensors + index); the
    finetune stage then streams its batches from there and ends at a finite loss."""
    import yaml

    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe
    from biwm.data.cache import read_index

    source = export(tmp_path, "realestate10k", "frames", clips=5, frames=8)
    do_import(source, tmp_path / "ds", "realestate10k", temporal_factor=1)
    recipe = tiny_recipe(tmp_path / "run", finetune={"steps": 3, "checkpoint_every": 3})
    recipe["stages"] = recipe["stages"][:1]
    recipe["data"] = {"source": "videos", "path": str(tmp_path / "ds"), "frames": 8, "heldout_clips": 1}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(biwm_cmd() + ["data", "cache", str(tmp_path / "ds"), "--recipe",
                                        str(tmp_path / "recipe.yaml"), "--clips-per-shard", "2"],
                          capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    [folder] = (tmp_path / "ds" / "cache").iterdir()
    index = read_index(folder)
    assert sorted(index.clips) == [f"clip{i:04d}" for i in range(5)] and index.prompts == ["a toy room"]
    assert sorted(p.name for p in folder.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors",
                                                             "shard-00002.safetensors"]
    assert (index.height, index.width, index.clips["clip0004"].latent_frames) == (32, 32, 8)
    console = Console(file=io.StringIO(), width=300)
    metrics = run_recipe(validate_recipe(recipe), console=console)["stages"]["finetune"]
    assert "streaming 4 training clips from the videos dataset's latent cache" in console.file.getvalue()
    assert metrics["finetune_steps"] == 3 and math.isfinite(metrics["finetune_loss_last"])

"""biwm-data: the toy world written in each peer format (``biwm data toyworld --format``) imports
back to its true poses (1e-4) and action labels; bad media get an exit-2 error naming the file;
``--skip-bad`` imports the rest and reports; a failed import leaves nothing; a finetune from the
imported dataset reaches the toy world's own loss; clips of different captions are each conditioned
on their own (finetune, distill, generate; cached or not); a streamed pass visits each clip once."""

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


def test_toyworld_export_prints_the_import_command_that_reads_it_back(tmp_path):
    """Key files carry no intrinsics and PNG folders no frame rate: the export says which flags import them."""
    import shlex

    out = subprocess.run(biwm_cmd() + ["data", "toyworld", "--out", str(tmp_path / "src"), "--format", "keys",
                                       "--media", "frames", "--clips", "2", "--frames", "9"],
                         capture_output=True, text=True, env=subprocess_env(COLUMNS="400"))
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("import it with: "))
    assert "--fov-deg 75" in line and "--source-fps 8" in line
    command = shlex.split(line.removeprefix("import it with: biwm ").replace("DATASET", str(tmp_path / "ds")))
    done = subprocess.run(biwm_cmd() + command, capture_output=True, text=True, env=subprocess_env(COLUMNS="400"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 clips, 18 frames at 8 fps" in done.stdout


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


# ----------------------------------------------------------------------------- per-clip captions, streaming

CAPTIONS = {"clip0000": "a red room", "clip0001": "a blue hall", "clip0002": "a red room", "clip0003": "a green yard",
            "clip0004": "a grey attic"}  # clip0004 is held out


def captioned_recipe(dataset, run_dir, layers=2, **stages):
    """A tiny recipe on ``dataset`` (4 training clips, 1 held out); ``layers`` changes the cache key."""
    recipe = tiny_recipe(run_dir)
    recipe["model"]["backbone"]["options"]["overrides"]["num_layers"] = layers
    recipe["data"] = {"source": "videos", "path": str(dataset), "frames": 8, "heldout_clips": 1}
    recipe["stages"] = [stages[name] | {"stage": name} for name in stages]
    return recipe


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """An imported dataset of 5 clips, 4 distinct captions (clip0000 and clip0002 share one), cached by the
    tiny backbone in 3 shards; returns (dataset, the cache folder, the cached tensors, the backbone)."""
    from biwm.core.checkpoint import load_tensors
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext
    from biwm.data.cache import build_cache

    tmp_path = tmp_path_factory.mktemp("captioned")
    source = export(tmp_path, "poses", "frames", clips=5, frames=8)
    (source / "captions.json").write_text(json.dumps(CAPTIONS))
    do_import(source, tmp_path / "ds", "poses", temporal_factor=1)
    recipe = validate_recipe(captioned_recipe(tmp_path / "ds", tmp_path / "run", finetune={}))
    ctx = RunContext(recipe=recipe, run_dir=tmp_path / "run")
    backbone = ctx.build_world_model().backbone
    folder = build_cache(tmp_path / "ds", backbone, ctx.cache_key(), clips_per_shard=2)
    tensors = {k: v for shard in sorted(folder.glob("shard-*")) for k, v in load_tensors(shard).items()}
    return tmp_path / "ds", folder, tensors, backbone


def encoded(backbone, caption):
    """One caption's conditioning, encoded on its own: (embeds [L, D], mask [L]) of the one encoder."""
    [(embeds, mask)] = [(e.embeds[0], e.mask[0]) for e in backbone.encode_text([caption]).encoders.values()]
    return embeds, mask


def assert_captions(text, captions, backbone):
    """Row i of ``text`` is ``captions[i]``'s conditioning encoded alone."""
    [enc] = text.encoders.values()
    assert enc.embeds.shape[0] == len(captions)
    for row, caption in enumerate(captions):
        embeds, mask = encoded(backbone, caption)
        torch.testing.assert_close(enc.embeds[row].cpu(), embeds, rtol=0, atol=0)
        assert torch.equal(enc.mask[row].cpu(), mask)


def which_clip(window, tensors, names):
    """The clip of ``names`` whose cached latents hold ``window`` [C, K, h, w] at some latent frame."""
    found = {name for name in names for start in range(tensors[f"{name}/latents"].shape[1] - window.shape[1] + 1)
             if torch.equal(tensors[f"{name}/latents"][:, start:start + window.shape[1]], window.cpu())}
    assert len(found) == 1, found
    return found.pop()


def test_clips_carry_their_own_captions_text_with_and_without_the_cache(captioned):
    """Clips of different captions each carry their own caption's conditioning, equal to the caption
    encoded alone: read from the cache, encoded now without one, and in a streamed batch."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext
    from biwm.data.cache import read_index

    dataset_dir, folder, tensors, backbone = captioned
    assert read_index(folder).prompts == sorted(set(CAPTIONS.values()))
    for layers in (2, 1):  # the cache's backbone, then one with another cache key: encoded now
        recipe = validate_recipe(captioned_recipe(dataset_dir, dataset_dir.parent / "run", layers, finetune={}))
        ctx = RunContext(recipe=recipe, run_dir=dataset_dir.parent / "run")
        dataset, key = ctx.dataset, ctx.cache_key()
        assert dataset.prompt == "a grey attic"  # the first held-out clip's, for what has no clips (play)
        train = dataset.latents("train", 4, 8, backbone, None, key)
        assert_captions(train.text, [CAPTIONS[f"clip000{i}"] for i in range(4)], backbone)
        [enc] = train.text.encoders.values()
        assert not torch.equal(enc.embeds[0], enc.embeds[1]) and torch.equal(enc.embeds[0], enc.embeds[2])
        assert_captions(dataset.latents("heldout", 1, 8, backbone, None, key).text, ["a grey attic"], backbone)
        stream = dataset.train_batches(3, 8, backbone, key, seed=0)
        assert (stream is None) == (layers == 1)
    batch = next(dataset.train_batches(3, 8, backbone, read_index(folder).backbone, seed=0))
    names = [f"clip000{i}" for i in batch.seeds]
    assert [which_clip(latents, tensors, names) for latents in batch.latents] == names
    assert_captions(batch.text, [CAPTIONS[n] for n in names], backbone)


def test_one_prompt_for_all_clips_carries_no_text(captioned):
    """data.prompt overrides the captions: no clip carries text of its own (the stages' one prompt)."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext

    dataset_dir, folder, tensors, backbone = captioned
    data = captioned_recipe(dataset_dir, dataset_dir.parent / "run", finetune={})
    data["data"]["prompt"] = "one prompt"
    ctx = RunContext(recipe=validate_recipe(data), run_dir=dataset_dir.parent / "run")
    assert ctx.dataset.prompt == "one prompt"
    assert ctx.dataset.latents("train", 2, 8, backbone, None, ctx.cache_key()).text is None
    assert next(ctx.dataset.train_batches(2, 8, backbone, ctx.cache_key(), seed=0)).text is None


def test_streamed_batches_visit_every_clip_once_per_pass(captioned):
    """Without replacement: every run of N consecutive clips of the stream (N the rank's share) is each
    clip once, in a fresh order each pass; batches are full even when N is not a multiple of the batch;
    ranks split the clips."""
    from biwm.data.cache import LatentShards

    shards = LatentShards(captioned[1])
    names = sorted(CAPTIONS)
    stream = shards.batches(names, 2, 8, seed=3)
    order = [i for _ in range(10) for i in next(stream).seeds]  # 20 clips: 4 passes of 5
    passes = [order[i:i + 5] for i in range(0, 20, 5)]
    assert all(sorted(p) == [0, 1, 2, 3, 4] for p in passes), passes
    assert len({tuple(p) for p in passes}) > 1, passes  # reshuffled
    shares = []
    for rank in (0, 1):
        stream = shards.batches(names, 2, 8, seed=3, rank=rank, world_size=2)
        share = [i for _ in range(3) for i in next(stream).seeds]
        mine = [0, 2, 4] if rank == 0 else [1, 3]
        assert all(sorted(share[i:i + len(mine)]) == mine for i in range(0, 6 - len(mine) + 1, len(mine))), share
        shares += mine
    assert sorted(shares) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("where", ["cache", "memory"])
def test_finetune_conditions_each_window_on_its_clips_caption(captioned, tmp_path, monkeypatch, where):
    """Every window of a finetune step gets its own clip's caption (the clip found by its latents); from
    the cache each pass of the stream is every training clip once."""
    import biwm.core.stages.finetune as finetune
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    dataset_dir, _, tensors, backbone = captioned
    seen = []
    loss = finetune.finetune_loss

    def recording(world, cfg, x0, history, camera, text, *rest, **kw):
        seen.append((x0.detach().cpu(), text))
        return loss(world, cfg, x0, history, camera, text, *rest, **kw)

    monkeypatch.setattr(finetune, "finetune_loss", recording)
    recipe = captioned_recipe(dataset_dir, tmp_path / "run", 2 if where == "cache" else 1,
                              finetune={"steps": 4, "batch_size": 2, "checkpoint_every": 4, "chunk_frames": 2,
                                        "max_history": 4})
    console = Console(file=io.StringIO(), width=300)
    metrics = run_recipe(validate_recipe(recipe), console=console)["stages"]["finetune"]
    assert ("streaming 4 training clips" in console.file.getvalue()) == (where == "cache")
    assert metrics["finetune_steps"] == 4 and math.isfinite(metrics["finetune_loss_last"])
    train = [f"clip000{i}" for i in range(4)]
    assert len(seen) == 4
    clips = [[which_clip(window, tensors, train) for window in x0] for x0, _ in seen]
    for (_, text), names in zip(seen, clips):
        assert_captions(text, [CAPTIONS[n] for n in names], backbone)
    if where == "cache":
        assert sorted(clips[0] + clips[1]) == train and sorted(clips[2] + clips[3]) == train


def test_distill_streams_from_the_cache_with_each_clips_caption(captioned, tmp_path, monkeypatch):
    """The distill stage reads a cached dataset batch by batch: its first batch is clips of the cache
    (latents and cameras equal), each with its own caption's conditioning, and two iterations of 2 are
    the 4 training clips, each once."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe
    from biwm.core.stages.distill import Distiller

    dataset_dir, _, tensors, backbone = captioned
    seen = []
    iteration = Distiller.iteration

    def recording(self, it, clips, camera, text, *rest, **kw):
        seen.append((clips.detach().cpu(), camera.to("cpu"), text))
        return iteration(self, it, clips, camera, text, *rest, **kw)

    monkeypatch.setattr(Distiller, "iteration", recording)
    recipe = captioned_recipe(dataset_dir, tmp_path / "run",
                              distill={"steps": 2, "batch_size": 2, "history_frames": 2, "chunks": 1,
                                       "chunk_frames": 2, "student_steps": 2, "generator_every": 1,
                                       "checkpoint_every": 10})
    console = Console(file=io.StringIO(), width=300)
    metrics = run_recipe(validate_recipe(recipe), console=console)["stages"]["distill"]
    assert "streaming 4 training clips from the videos dataset's latent cache" in console.file.getvalue()
    assert metrics["distill_iterations"] == 2 and metrics["generator_updates"] == 2
    assert math.isfinite(metrics["distill_critic_loss_last"])
    train = [f"clip000{i}" for i in range(4)]
    names = []
    for clips, camera, text in seen:
        batch = [which_clip(latents, tensors, train) for latents in clips]
        for row, name in enumerate(batch):
            assert torch.equal(clips[row], tensors[f"{name}/latents"])  # the whole clip, from frame 0
            torch.testing.assert_close(camera.c2w[row], tensors[f"{name}/c2w"], rtol=0, atol=0)
        assert_captions(text, [CAPTIONS[n] for n in batch], backbone)
        names += batch
    assert sorted(names) == train


def test_generate_rolls_each_held_out_clip_out_on_its_caption(captioned, tmp_path, monkeypatch):
    """Two held-out clips of different captions: each trajectory's rollout is conditioned on its own."""
    import biwm.core.evaluation as evaluation
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    dataset_dir, _, _, backbone = captioned
    rolled = []
    rollout = evaluation.rollout_video

    def recording(world, text, *rest, **kw):
        rolled.append(text)
        return rollout(world, text, *rest, **kw)

    monkeypatch.setattr(evaluation, "rollout_video", recording)
    recipe = captioned_recipe(dataset_dir, tmp_path / "run",
                              generate={"trajectories": 2, "history_frames": 2, "chunks": 1, "chunk_frames": 2,
                                        "steps": 1, "shuffled_baseline": False, "write_videos": False})
    recipe["data"]["heldout_clips"] = 2
    run_recipe(validate_recipe(recipe), console=Console(file=io.StringIO()))
    [text] = rolled
    assert_captions(text, ["a green yard", "a grey attic"], backbone)

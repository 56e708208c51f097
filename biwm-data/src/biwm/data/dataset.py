"""The ``videos`` dataset: an imported dataset folder (:mod:`biwm.data.store`) as a
:class:`biwm.core.protocols.ClipSource`.

Clips are split by order: the last ``heldout_clips`` are held out, the ones before train. A clip
gives the first ``1 + tf*(F-1)`` of its frames for a request of F latent frames; clips may be of
different lengths, and a request longer than a clip is an error naming it. Latents come from the
dataset's cache (``biwm data cache``) when it holds this backbone at this resolution, else the
frames are encoded now (and kept in the run's cache). Clips whose captions differ each carry their
own caption's text conditioning (``LatentClips.text``: from the cache, or encoded now), unless
``prompt`` sets one for all. Its action labels integrate to poses with the steps the import used
(:class:`biwm.core.protocols.ActionSteps`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from biwm.core.camera import CameraTrack
from biwm.core.config import InputPath, Strict
from biwm.core.data import LatentClips, encode_clips, video_frames_for
from biwm.core.protocols import Backbone
from biwm.core.text import TextConditioning
from biwm.data.store import DatasetManifest, clip_camera, read_clip, read_manifest


class VideosData(Strict):
    """Options of the ``videos`` dataset: a recipe's ``data:`` with ``source: videos``."""

    source: Literal["videos"] = "videos"
    path: InputPath = Field(description="the dataset folder biwm data import wrote (relative to the recipe)")
    frames: int = Field(17, ge=2, description="video frames per training clip (1 + 4k for a 4x temporal codec)")
    heldout_clips: int = Field(1, ge=0, description="the last N clips, held out for generate and evaluate")
    train_clips: int | None = Field(None, ge=1, description="training clips (default: all the others)")
    prompt: str | None = Field(None, description="one prompt for every clip instead of their captions "
                               "(default: each clip its own caption)")

    @model_validator(mode="after")
    def _check(self) -> VideosData:
        manifest = read_manifest(self.path)
        available = len(manifest.clips) - self.heldout_clips
        if available < 1:
            raise ValueError(f"{self.path} holds {len(manifest.clips)} clips; heldout_clips {self.heldout_clips} "
                             "leaves none to train on")
        if self.train_clips is not None and self.train_clips > available:
            raise ValueError(f"train_clips {self.train_clips}: {self.path} holds {available} training clips")
        return self

    def frame_size_fields(self) -> dict[str, int]:
        clip = read_manifest(self.path).clips[0]
        return {"path (its frame height)": clip.height, "path (its frame width)": clip.width}


class VideosDataset:
    """An imported dataset as a :class:`biwm.core.protocols.ClipSource` (and ``ActionSteps``)."""

    def __init__(self, options: VideosData):
        self.options = options
        self.manifest: DatasetManifest = read_manifest(options.path)
        clips = self.manifest.clips
        self.heldout = clips[len(clips) - options.heldout_clips:] if options.heldout_clips else []
        self.train = clips[:len(clips) - options.heldout_clips][:options.train_clips]
        self.train_clips, self.frames = len(self.train), options.frames
        # clips of different captions carry their own text (LatentClips.text); the prompt is then for what
        # has no clip to take it from (play, which starts from held-out clip 0): that clip's caption
        self.per_clip_text = options.prompt is None and len({c.caption for c in clips}) > 1
        self.prompt = options.prompt if options.prompt is not None else (self.heldout or clips)[0].caption
        self.move_step, self.turn_step_deg = self.manifest.move_step, self.manifest.turn_step_deg

    def latents(self, split: Literal["train", "heldout"], count: int, latent_frames: int, backbone: Backbone,
                cache_dir: Path | None, cache_key: str, device: torch.device | str = "cpu",
                keep_frames: bool = False, start: int = 0) -> LatentClips:
        clips = (self.train if split == "train" else self.heldout)[start:start + count]
        if len(clips) < count:
            raise ValueError(f"dataset {self.options.path}: {split} clips {start}..{start + count - 1} asked for; it "
                             f"has {len(self.train if split == 'train' else self.heldout)} {split} clips")
        frames = video_frames_for(latent_frames, backbone.temporal_factor)
        short = [c.name for c in clips if c.frames < frames]
        if short:
            raise ValueError(f"dataset {self.options.path}: clips {', '.join(short)} have fewer than the {frames} "
                             "frames asked for")
        from biwm.data.cache import cached_latents

        cached = cached_latents(self.options.path, cache_key, [c.name for c in clips], latent_frames,
                                backbone.temporal_factor, keep_frames=keep_frames, text=self.per_clip_text)
        if cached is not None:
            cached.seeds = list(range(start, start + count))
            return cached
        tensors = [read_clip(self.options.path, c.name) for c in clips]
        camera = CameraTrack.cat([clip_camera(t, slice(0, frames)) for t in tensors])
        video = torch.stack([t["frames"][:frames] for t in tensors])
        encoded = encode_clips(_Clips(video, camera, list(range(start, start + count))), backbone, device=device,
                               keep_frames=keep_frames)
        if self.per_clip_text:
            encoded.text = captions_text(backbone, [c.caption for c in clips])
        return encoded

    def train_batches(self, batch_size: int, latent_frames: int, backbone: Backbone, cache_key: str, seed: int,
                      rank: int = 0, world_size: int = 1) -> Iterator[LatentClips] | None:
        """Training batches streamed from the dataset's latent cache (memory-mapped shards, shuffled
        across them, this rank's share), or None without a cache for this backbone
        (:class:`biwm.core.protocols.StreamedClips`)."""
        from biwm.data.cache import open_cache

        shards = open_cache(self.options.path, cache_key, backbone.temporal_factor)
        names = [c.name for c in self.train]
        if shards is None or not set(names) <= set(shards.index.clips):
            return None
        return shards.batches(names, batch_size, latent_frames, seed, rank, world_size, text=self.per_clip_text)


@torch.no_grad()
def captions_text(backbone: Backbone, captions: list[str]) -> TextConditioning:
    """One row per caption (on the CPU), each distinct caption encoded once."""
    distinct = sorted(set(captions))
    return backbone.encode_text(distinct).select([distinct.index(c) for c in captions]).to("cpu")


class _Clips:
    """Decoded clips as :func:`biwm.core.data.encode_clips` reads them."""

    def __init__(self, frames: torch.Tensor, camera: CameraTrack, seeds: list[int]):
        self.frames, self.camera, self.seeds = frames, camera, seeds


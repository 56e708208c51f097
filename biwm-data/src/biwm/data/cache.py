"""``biwm data cache``: every clip of a dataset encoded once by a backbone, kept beside it::

    DATASET/cache/KEY/index.json             backbone, resolution, which shard holds which clip, prompts
    DATASET/cache/KEY/shard-00000.safetensors per clip NAME: NAME/latents [C, F, h, w], NAME/c2w [T, 4, 4],
                                             NAME/intrinsics [3, 3] (normalised), NAME/actions [T]
    DATASET/cache/KEY/text.safetensors       one row per distinct caption: ENCODER/embeds, ENCODER/mask

KEY hashes the backbone (its name and options, as a run's ``cache_key``) and the frame size, so
one dataset holds caches of several backbones. The cache folder appears only when complete.
Shards are read memory-mapped (:class:`LatentShards`): a clip's latents (and its caption's text
row) are paged in when a batch needs them, and batches draw clips shuffled across shards, per rank,
without replacement (every pass over a rank's share is each of its clips once).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open

from biwm.core.camera import CameraTrack
from biwm.core.checkpoint import atomic_folder, save_tensors
from biwm.core.data import LatentClips, latent_aligned_camera
from biwm.core.protocols import Backbone
from biwm.core.text import TextConditioning, TextEncoding
from biwm.data.store import clip_camera, read_clip, read_manifest

INDEX = "index.json"
TEXT = "text.safetensors"


class CachedClip(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shard: str
    latent_frames: int
    prompt: int  # row of text.safetensors


class CacheIndex(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str  # the run's cache_key: backbone name and options
    height: int
    width: int
    temporal_factor: int
    clips: dict[str, CachedClip]
    prompts: list[str]


def cache_folder(dataset: Path, backbone_key: str, height: int, width: int) -> Path:
    key = hashlib.sha256(json.dumps([backbone_key, height, width]).encode()).hexdigest()[:16]
    return Path(dataset) / "cache" / key


def _frame_size(dataset: Path) -> tuple[int, int]:
    clips = read_manifest(dataset).clips
    sizes = {(c.height, c.width) for c in clips}
    if len(sizes) > 1:
        raise ValueError(f"{dataset}: clips of several frame sizes {sorted(sizes)}; a cache holds one")
    return sizes.pop()


@torch.no_grad()
def build_cache(dataset: Path, backbone: Backbone, backbone_key: str, clips_per_shard: int = 64,
                device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> Path:
    """Encode every clip of ``dataset`` (its latents, whole clips cut to ``1 + tf*k`` frames) and every
    distinct caption; returns the cache folder (replaced if it was there)."""
    manifest = read_manifest(dataset)
    height, width = _frame_size(dataset)
    tf = backbone.temporal_factor
    folder = cache_folder(dataset, backbone_key, height, width)
    prompts = sorted({c.caption for c in manifest.clips})
    index = CacheIndex(backbone=backbone_key, height=height, width=width, temporal_factor=tf, clips={},
                       prompts=prompts)
    with atomic_folder(folder) as tmp:
        text = backbone.encode_text(prompts)
        save_tensors({f"{name}/{part}": getattr(enc, part).cpu().contiguous()
                      for name, enc in text.encoders.items() for part in ("embeds", "mask")}, tmp / TEXT)
        shard: dict[str, torch.Tensor] = {}
        for number, clip in enumerate(manifest.clips):
            tensors = read_clip(dataset, clip.name)
            frames = 1 + tf * ((clip.frames - 1) // tf)
            video = tensors["frames"][:frames].to(device).float().div(127.5).sub(1).transpose(0, 1)[None]
            latents = backbone.encode_video(video)[0].float().cpu()
            camera = clip_camera(tensors, slice(0, frames))
            shard_name = f"shard-{len(index.clips) // clips_per_shard:05d}.safetensors"
            shard.update({f"{clip.name}/latents": latents.contiguous(), f"{clip.name}/c2w": camera.c2w[0],
                          f"{clip.name}/intrinsics": camera.intrinsics[0], f"{clip.name}/actions": camera.actions[0]})
            index.clips[clip.name] = CachedClip(shard=shard_name, latent_frames=latents.shape[1],
                                                prompt=prompts.index(clip.caption))
            if len(index.clips) % clips_per_shard == 0 or number == len(manifest.clips) - 1:
                save_tensors(shard, tmp / shard_name)
                shard = {}
            if progress is not None:
                progress(1)
        (tmp / INDEX).write_text(index.model_dump_json(indent=2) + "\n")
    return folder


def read_index(folder: Path) -> CacheIndex | None:
    path = folder / INDEX
    return CacheIndex.model_validate_json(path.read_text()) if path.is_file() else None


class LatentShards:
    """A cache read memory-mapped: clips by name, or shuffled batches across shards."""

    def __init__(self, folder: Path):
        index = read_index(folder)
        if index is None:
            raise FileNotFoundError(f"{folder / INDEX}: no latent cache; expected one written by biwm data cache")
        self.folder, self.index = folder, index
        self._open: dict[str, object] = {}

    def _shard(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(str(self.folder / name), "pt")  # memory-mapped
        return self._open[name]

    def clips(self, names: list[str], latent_frames: int, text: bool = False) -> LatentClips:
        """Clips ``names``, each its first ``latent_frames`` latent frames, as :class:`LatentClips` (with
        their captions' text conditioning when ``text``)."""
        tf = self.index.temporal_factor
        frames = 1 + tf * (latent_frames - 1)
        latents, tracks = [], []
        for name in names:
            entry = self.index.clips[name]
            if entry.latent_frames < latent_frames:
                raise ValueError(f"{self.folder}: clip {name} has {entry.latent_frames} latent frames; "
                                 f"{latent_frames} asked for")
            shard = self._shard(entry.shard)
            latents.append(shard.get_slice(f"{name}/latents")[:, :latent_frames])
            tracks.append(CameraTrack(shard.get_slice(f"{name}/c2w")[:frames][None],
                                      shard.get_tensor(f"{name}/intrinsics")[None],
                                      shard.get_slice(f"{name}/actions")[:frames][None]))
        camera = latent_aligned_camera(CameraTrack.cat(tracks), tf)
        return LatentClips(torch.stack(latents), camera, None, list(range(len(names))),
                           self.prompt_rows([self.index.clips[name].prompt for name in names]) if text else None)

    def prompt_rows(self, rows: list[int]) -> TextConditioning:
        """Rows ``rows`` of the cached captions' text conditioning (``index.prompts`` order), each read
        memory-mapped on its own."""
        file = self._shard(TEXT)
        encoders = dict.fromkeys(key.rsplit("/", 1)[0] for key in file.keys())
        if not encoders:
            raise ValueError(f"{self.folder / TEXT}: holds no text encoder's embeds; rebuild with biwm data cache")

        def stacked(key: str) -> torch.Tensor:
            tensor = file.get_slice(key)
            return torch.cat([tensor[row:row + 1] for row in rows])

        return TextConditioning({name: TextEncoding(stacked(f"{name}/embeds"), stacked(f"{name}/mask"))
                                 for name in encoders})

    def batches(self, names: list[str], batch_size: int, latent_frames: int, seed: int, rank: int = 0,
                world_size: int = 1, text: bool = False) -> Iterator[LatentClips]:
        """Endless batches of ``batch_size`` of ``names`` (this rank's share) without replacement: the
        share in a fresh order across shards every pass, one pass after the other (a batch may straddle
        two). A batch's ``seeds`` are its clips' positions in ``names``; ``text`` as in :meth:`clips`."""
        mine = list(range(rank, len(names), world_size))
        if not mine:
            raise ValueError(f"{self.folder}: rank {rank} of {world_size} gets none of the {len(names)} clips")
        generator = torch.Generator().manual_seed(seed)

        def passes() -> Iterator[int]:
            while True:
                yield from (mine[i] for i in torch.randperm(len(mine), generator=generator).tolist())

        order = passes()
        while True:
            picked = list(islice(order, batch_size))
            clips = self.clips([names[i] for i in picked], latent_frames, text)
            clips.seeds = picked
            yield clips


def open_cache(dataset: Path, backbone_key: str, temporal_factor: int) -> LatentShards | None:
    """The dataset's cache for this backbone (at the dataset's frame size), or None."""
    height, width = _frame_size(dataset)
    folder = cache_folder(dataset, backbone_key, height, width)
    index = read_index(folder)
    return LatentShards(folder) if index is not None and index.temporal_factor == temporal_factor else None


def cached_latents(dataset: Path, backbone_key: str, names: list[str], latent_frames: int, temporal_factor: int,
                   keep_frames: bool = False, text: bool = False) -> LatentClips | None:
    """``names`` from the dataset's cache for this backbone (with their captions' text conditioning when
    ``text``), or None when it has no complete one."""
    shards = open_cache(dataset, backbone_key, temporal_factor)
    if shards is None or any(shards.index.clips.get(n) is None or shards.index.clips[n].latent_frames < latent_frames
                             for n in names):
        return None
    clips = shards.clips(names, latent_frames, text)
    if keep_frames:
        frames = 1 + temporal_factor * (latent_frames - 1)
        clips.frames = torch.stack([read_clip(dataset, n)["frames"][:frames] for n in names])
    return clips

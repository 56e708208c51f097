"""The window: the one structure training, rollout and evaluation share.

A window holds the clean history latents (frames 0..H-1), the noisy chunk (frames H..H+K-1),
one camera track covering both, text conditioning and the attention mode. ``WorldModel``
turns it into a token sequence (compressed history + chunk), runs the backbone with per-token
timesteps (history 0, or its noise level when the history is noised: :func:`noise_history`) and
un-embeds the chunk's tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from biwm.core.camera import CameraTrack
from biwm.core.protocols import AttentionMode, Backbone, HistoryTokens, grid_positions
from biwm.core.schedule import add_noise
from biwm.core.text import TextConditioning


@dataclass
class Window:
    text: TextConditioning  # one row per sample (the backbone's encode_text)
    chunk: Tensor  # [B, C, K, h, w] noisy latents
    timestep: Tensor  # [B] the backbone's timestep of the chunk's noise level: backbone.timestep(sigma)
    history: Tensor | None = None  # [B, C, H, h, w] clean latents, H may be 0
    camera: CameraTrack | None = None  # video rate, (H + K) * temporal_factor frames
    control_mask: Tensor | None = None  # [B] 1 keeps control, 0 drops it (classifier-free guidance)
    attention: AttentionMode | None = None  # None: the model's own (WorldModel.attention)
    history_sigma: Tensor | None = None  # [B] noise level of the history (None: clean); see noise_history

    @property
    def history_length(self) -> int:
        return 0 if self.history is None else self.history.shape[2]

    def with_chunk(self, chunk: Tensor, timestep: Tensor) -> "Window":
        return replace(self, chunk=chunk, timestep=timestep)


def noise_history(window: Window, sigma: Tensor | float, noise: Tensor) -> Window:
    """``window`` with its history noised to flow-matching level ``sigma`` ([B] or one level) with
    ``noise`` (the history's shape), the level recorded so the model sees it as the history tokens'
    timestep (noise augmentation of the context, as GameNGen and Diffusion Forcing train: a model that
    knows its history may be imperfect leans less on the artefacts of its own earlier chunks)."""
    if window.history is None or window.history.shape[2] == 0:
        return window
    b = window.history.shape[0]
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=window.history.device).expand(b)
    return replace(window, history=add_noise(window.history, noise.to(window.history.dtype), sigma),
                   history_sigma=sigma)


def relative_to_frame(camera: CameraTrack, frame: int) -> CameraTrack:
    """Poses expressed in the camera frame of video frame ``frame`` (egocentric control that
    does not drift with the length of a rollout)."""
    ref = camera.c2w[:, frame : frame + 1]
    # inv_ex: the same inverse as linalg.inv without its error check, which would wait for the GPU
    return CameraTrack(torch.linalg.inv_ex(ref).inverse @ camera.c2w, camera.intrinsics, camera.actions)


def causal_mask(positions: Tensor, history_tokens: int) -> Tensor:
    """Boolean [L, L] mask of the causal baseline: history never sees the chunk; a chunk token sees
    history and chunk frames up to its own."""
    frame = positions[:, 0]
    mask = frame[None, :] <= frame[:, None]
    mask[:history_tokens, :history_tokens] = True
    mask[:history_tokens, history_tokens:] = False
    return mask


class WorldModel(nn.Module):
    """Backbone + control injectors + history compressor, composed per window. ``attention`` is the
    model's window attention (a recipe's ``model.attention``); a window may override it."""

    def __init__(self, backbone: Backbone, controls: dict[str, nn.Module], compressor: nn.Module,
                 attention: AttentionMode = "bidirectional"):
        super().__init__()
        self.attention: AttentionMode = attention
        self.backbone = backbone
        self.controls = nn.ModuleDict(controls)
        self.compressor = compressor
        self.last_window_tokens: int | None = None  # set by each forward: what the blocks attended over

    @property
    def _no_split_modules(self) -> list[str]:
        """The class names of the modules the backbone shards as units (its optional ``shard_units``, else the
        blocks it runs, ``block_modules``): accelerate's FSDP auto-wrap (TRANSFORMER_BASED_WRAP) shards each as
        its own unit, gathered by its forward (or the ``window_forward`` it is run by:
        :func:`biwm.core.sharded.register_window_forwards`); the rest of the model (embeddings, controls,
        compressor, output) is the root's, gathered by this forward. A critic's ``loss_heads`` (the distill
        stage's losses with parameters, e.g. gan's head) are units too, each gathered by its own forward."""
        units = [*getattr(self.backbone, "shard_units", self.backbone.block_modules)(), *getattr(self, "loss_heads", ())]
        return sorted({type(block).__name__ for block in units})

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What checkpoints hold: the transformer, the controls, the compressor (not the codec)."""
        return {"transformer": self.backbone.trainable(), "controls": self.controls, "compressor": self.compressor}

    def control_embedding(self, camera: CameraTrack | None, frames: Tensor, grid: tuple[int, int, int],
                          mask: Tensor | None) -> dict[str, Tensor | None]:
        """Sum of the injectors for latent ``frames`` of the window, per target ("tokens",
        "modulation"), each [B, D, F, h', w'] or None."""
        out: dict[str, Tensor | None] = {"tokens": None, "modulation": None}
        if not len(self.controls) or camera is None:
            return out
        tf = self.backbone.temporal_factor
        video_index = (frames[:, None] * tf + torch.arange(tf, device=frames.device)).flatten()
        sub = camera.frames(video_index)
        for control in self.controls.values():
            emb = control(sub, grid, self.backbone)
            if mask is not None:
                emb = emb * mask.to(emb.dtype).view(-1, 1, 1, 1, 1)
            out[control.target] = emb if out[control.target] is None else out[control.target] + emb
        return out

    def history_tokens(self, window: Window, camera: CameraTrack | None, hw: tuple[int, int],
                       query: Tensor | None = None) -> HistoryTokens | None:
        length = window.history_length
        if length == 0:
            return None
        needed = self.compressor.frames_needed(length)
        device = window.chunk.device
        if isinstance(needed, slice):
            frames = torch.arange(needed.start, needed.stop, device=device)
            latents = window.history[:, :, needed]
        else:  # a sorted list of frame indices (e.g. an anchor frame plus the newest frames)
            frames = torch.tensor(list(needed), device=device)
            latents = window.history.index_select(2, frames)
        control = self.control_embedding(camera, frames, (len(frames), *hw), window.control_mask)
        return self.compressor.compress(latents, frames, control["tokens"], self.backbone,
                                        modulation=control["modulation"], query=query)

    def forward(self, window: Window) -> Tensor:
        """Velocity prediction for the window's chunk, [B, C, K, h, w]."""
        bb = self.backbone
        tf = bb.temporal_factor
        k = window.chunk.shape[2]
        start = window.history_length
        camera = None
        if window.camera is not None:
            if window.camera.num_frames != (start + k) * tf:
                raise ValueError(f"window camera has {window.camera.num_frames} frames, expected "
                                 f"{(start + k) * tf} for {start} history + {k} chunk latent frames")
            camera = relative_to_frame(window.camera, start * tf)

        chunk_tokens = bb.patch_embed(window.chunk)  # [B, D, K', h', w']
        grid = tuple(chunk_tokens.shape[2:])
        chunk_frames = torch.arange(start, start + grid[0], device=window.chunk.device)
        control = self.control_embedding(camera, chunk_frames, grid, window.control_mask)
        if control["tokens"] is not None:
            chunk_tokens = chunk_tokens + control["tokens"].to(chunk_tokens.dtype)
        chunk_seq = chunk_tokens.flatten(2).transpose(1, 2).contiguous()  # one layout with or without history
        chunk_mod = None if control["modulation"] is None else control["modulation"].flatten(2).transpose(1, 2)
        chunk_pos = grid_positions(chunk_frames * 1.0, grid[1], grid[2], device=chunk_seq.device)

        history = self.history_tokens(window, camera, grid[1:], query=chunk_seq)
        batch = chunk_seq.shape[0]
        t_chunk = window.timestep.to(chunk_seq.device, torch.float32)[:, None].expand(batch, chunk_seq.shape[1])
        if history is None:
            seq, positions, timesteps, modulation, n_hist = chunk_seq, chunk_pos, t_chunk, chunk_mod, 0
        else:
            n_hist = history.length
            seq = torch.cat([history.tokens.to(chunk_seq.dtype), chunk_seq], dim=1)
            positions = torch.cat([history.positions, chunk_pos], dim=0)
            t_hist = t_chunk.new_zeros(batch, n_hist) if window.history_sigma is None else \
                bb.timestep(window.history_sigma.to(t_chunk))[:, None].expand(batch, n_hist)
            timesteps = torch.cat([t_hist, t_chunk], dim=1)
            modulation = None
            if chunk_mod is not None:
                hist_mod = history.modulation if history.modulation is not None else chunk_mod.new_zeros(
                    batch, n_hist, chunk_mod.shape[-1])
                modulation = torch.cat([hist_mod, chunk_mod], dim=1)

        self.last_window_tokens = seq.shape[1]  # history + chunk tokens the blocks saw (a Python int: no sync)
        mask = causal_mask(positions, n_hist) if (window.attention or self.attention) == "causal" else None
        out = bb.run_blocks(seq, timesteps, window.text, bb.rotary(positions), attention_mask=mask,
                            modulation=modulation)
        out = type(out)(hidden=out.hidden[:, n_hist:], temb=out.temb[:, n_hist:])
        return bb.unembed(out, grid)

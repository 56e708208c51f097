"""Latent codecs and text encoders for CPU-sized `tiny` presets (shared by every backbone).

The pixel codec is lossless (pixel-unshuffle), so toy-world experiments measure the world
model and not a VAE; the byte text encoder is a fixed random embedding of UTF-8 bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from biwm.core.text import TextEncoding


class PixelCodec(nn.Module):
    """Frames [B, 3, T, H, W] in [-1, 1] <-> latents [B, 3*s*s, T, H/s, W/s] by pixel (un)shuffle."""

    temporal_factor = 1

    def __init__(self, spatial_factor: int):
        super().__init__()
        self.spatial_factor = spatial_factor

    @property
    def latent_channels(self) -> int:
        return 3 * self.spatial_factor**2

    def encode(self, frames: Tensor) -> Tensor:
        s = self.spatial_factor
        b, c, t, h, w = frames.shape
        if h % s or w % s:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the codec's spatial factor {s}")
        x = frames.transpose(1, 2).reshape(b * t, c, h, w)
        x = F.pixel_unshuffle(x, s)
        return x.reshape(b, t, c * s * s, h // s, w // s).transpose(1, 2)

    def decode(self, latents: Tensor) -> Tensor:
        s = self.spatial_factor
        b, c, t, h, w = latents.shape
        x = latents.transpose(1, 2).reshape(b * t, c, h, w)
        x = F.pixel_shuffle(x, s).clamp(-1, 1)
        return x.reshape(b, t, c // (s * s), h * s, w * s).transpose(1, 2)

    def stream_decoder(self) -> "PixelCodec":
        return self  # stateless: decoding chunk by chunk is plain decoding


class ByteTextEncoder(nn.Module):
    """Deterministic text embedding for tiny presets: a fixed random vector per UTF-8 byte.

    The empty prompt maps to all zeros, the null condition used for classifier-free guidance. The
    mask marks the prompt's bytes; the padding after them is zero as well.
    """

    def __init__(self, text_dim: int, max_length: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("table", torch.randn(256, text_dim, generator=g, device="cpu"), persistent=False)
        self.max_length = max_length

    def forward(self, prompts: list[str]) -> TextEncoding:
        out = torch.zeros(len(prompts), self.max_length, self.table.shape[1], device=self.table.device)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool, device=self.table.device)
        for i, prompt in enumerate(prompts):
            ids = torch.tensor(list(prompt.encode("utf-8"))[: self.max_length], dtype=torch.long)
            out[i, : len(ids)] = self.table[ids.to(self.table.device)]
            mask[i, : len(ids)] = True
        return TextEncoding(out, mask)

"""Built-in control injectors: Plücker rays and the 81 discrete actions (METHODS.md §2).

Both return embeddings aligned with the patch tokens, [B, D, F, h', w'], through a zero-initialised
output layer so fine-tuning starts exactly from the pretrained backbone. Cameras arrive at video
rate, ``temporal_factor`` frames per latent frame, already relative to the window's reference
frame (see ``biwm.core.window``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biwm.core.camera import NUM_ACTIONS, CameraTrack, plucker_rays
from biwm.core.protocols import Backbone, zero_module


class PluckerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=1, description="width of the ray encoder before the zero-initialised projection")
    target: Literal["tokens", "modulation"] = Field(
        "tokens", description="add to the tokens, or to the per-token timestep embedding (AdaLN)")


class PluckerControl(nn.Module):
    """Plücker rays at latent resolution, the frames of a latent frame stacked (6*tf channels),
    patchified like the tokens, then a zero-initialised projection added to the tokens."""

    def __init__(self, options: PluckerOptions, backbone: Backbone):
        super().__init__()
        self.target = options.target
        tf = backbone.temporal_factor
        _, ph, pw = backbone.patch_size
        self.encode = nn.Conv3d(6 * tf, options.hidden, kernel_size=(1, ph, pw), stride=(1, ph, pw))
        self.act = nn.SiLU()
        self.project = zero_module(nn.Conv3d(options.hidden, backbone.hidden_dim, kernel_size=1))

    def forward(self, camera: CameraTrack, grid: tuple[int, int, int], backbone: Backbone) -> Tensor:
        frames, h, w = grid
        _, ph, pw = backbone.patch_size
        rays = plucker_rays(camera.c2w, camera.intrinsics, h * ph, w * pw)  # [B, F*tf, 6, H, W]
        b = rays.shape[0]
        rays = rays.reshape(b, frames, -1, h * ph, w * pw).transpose(1, 2)  # [B, 6*tf, F, H, W]
        x = self.act(self.encode(rays.to(self.encode.weight.dtype)))
        # the 1x1x1 projection as a matmul over channels (the same numbers as the Conv3d whose weights it
        # uses): inductor's convolution backward fixes the input's size, so a compiled training step
        # would recompile for every history length (torch 2.11)
        weight = self.project.weight.flatten(1)
        return torch.nn.functional.linear(x.movedim(1, -1), weight, self.project.bias).movedim(-1, 1)


class ActionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=1, description="per-frame action embedding width")
    target: Literal["modulation", "tokens"] = Field(
        "modulation", description="add to the timestep embedding (AdaLN of every block) or to the tokens")


class ActionControl(nn.Module):
    """One learned vector per discrete action and video frame, concatenated per latent frame and
    projected (zero-initialised) to the model width, for every token of that frame. By default it
    joins the timestep embedding, so it scales and shifts every block like the noise level does."""

    def __init__(self, options: ActionOptions, backbone: Backbone):
        super().__init__()
        self.target = options.target
        tf = backbone.temporal_factor
        self.embed = nn.Embedding(NUM_ACTIONS, options.hidden)
        self.mix = nn.Sequential(nn.Linear(tf * options.hidden, options.hidden), nn.SiLU())
        self.project = zero_module(nn.Linear(options.hidden, backbone.hidden_dim))

    def forward(self, camera: CameraTrack, grid: tuple[int, int, int], backbone: Backbone) -> Tensor:
        if camera.actions is None:
            raise ValueError("control 'actions' needs discrete actions in the camera track "
                             "(the data has poses only: use the 'plucker' control)")
        frames, h, w = grid
        b = camera.actions.shape[0]
        e = self.embed(camera.actions).reshape(b, frames, -1)  # [B, F, tf*hidden]
        e = self.project(self.mix(e))  # [B, F, D]
        return e.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, h, w)

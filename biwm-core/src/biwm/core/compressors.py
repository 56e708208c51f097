"""Built-in history compressor ``none``: the last N history frames at full resolution."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biwm.core.protocols import Backbone, HistoryTokens, grid_positions


class LastFramesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_frames: int | None = Field(8, ge=1, description="history latent frames kept (null: unbounded window)")


class LastFrames(nn.Module):
    def __init__(self, options: LastFramesOptions, backbone: Backbone | None = None):
        super().__init__()
        self.max_frames = options.max_frames

    def frames_needed(self, history_length: int) -> slice:
        keep = history_length if self.max_frames is None else min(history_length, self.max_frames)
        return slice(history_length - keep, history_length)

    def token_budget(self, history_length: int, grid_hw: tuple[int, int]) -> int:
        sl = self.frames_needed(history_length)
        return (sl.stop - sl.start) * grid_hw[0] * grid_hw[1]

    def compress(self, latents: Tensor, frame_index: Tensor, control: Tensor | None,
                 backbone: Backbone, modulation: Tensor | None = None, query: Tensor | None = None) -> HistoryTokens:
        tokens = backbone.patch_embed(latents)
        if control is not None:
            tokens = tokens + control.to(tokens.dtype)
        _, _, f, h, w = tokens.shape
        return HistoryTokens(tokens.flatten(2).transpose(1, 2),
                             grid_positions(frame_index * 1.0, h, w, device=tokens.device),
                             None if modulation is None else modulation.flatten(2).transpose(1, 2))

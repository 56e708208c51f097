"""LTX-2.3 through diffusers' LTX2VideoTransformer3DModel and AutoencoderKLLTX2Video.

The transformer is a joint audio+video model; BiWM is video-only. Each of diffusers' blocks runs as it is,
with the audio stream replaced by a minimal stand-in (one zero token, no rotary embedding, no timestep
embedding) and the audio-video cross-attention off in both directions (diffusers' ``isolate_modalities``,
the video-only pass LTX-2.3's modality guidance runs). The video stream then never reads the audio
stream: the blocks' video output is what diffusers' forward gives for the same video with any audio
(tests/test_ltx.py shows it), and the stand-in's work (one token) costs nothing.

Around the blocks the adapter re-composes the model from its own submodules, as the Wan and
HunyuanVideo-1.5 adapters do: diffusers' pipeline packs latents into tokens for the Linear patchifier
(``proj_in``) and unpacks ``proj_out``'s; the timestep embedding (``time_embed``) is per token, with control
added before its projection; the prompt's cross-attention modulation (``prompt_adaln``, LTX-2.3) takes
one noise level per sample, the chunk's (the highest of the window); rotary frequencies come from
diffusers' own ``rope`` at coordinates built as its ``prepare_video_coords`` builds them, from any (also
fractional) (frame, row, col) position. Text is Gemma 3 through LTX-2's text connectors (video stream),
or a byte stand-in of the connectors' width.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from biwm.core.config import InputDir
from biwm.core.protocols import BlockOutput
from biwm.core.sharded import ATTENTION_FEATURES  # the block method packforcing scores with
from biwm.core.text import TextConditioning, TextEncoding

from biwm.backbones.codecs import ByteTextEncoder
from biwm.backbones.common import (DTYPES, BackboneConfigError, BackboneOptions, CachedTextEncoders, ContextVAECodec,
                                    DiffusersBackbone, load_text_encoders_once, attach_block_method)

# LTX-2.3 as diffusers converts it: scripts/convert_ltx2_to_diffusers.py (huggingface/diffusers, added with
# LTX-2.3 support in #13217, unchanged since), version "2.3" ("model_id": "Lightricks/LTX-2.3"):
# get_ltx2_transformer_config, get_ltx2_connectors_config and get_ltx2_video_vae_config (timestep_conditioning
# at the script's default, False). The transformer has 19.0B parameters, the connectors 3.2B: 22B together.
LTX_23_TRANSFORMER = dict(
    in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32, attention_head_dim=128,
    cross_attention_dim=4096, vae_scale_factors=(8, 32, 32), pos_embed_max_pos=20, base_height=2048, base_width=2048,
    gated_attn=True, cross_attn_mod=True, audio_in_channels=128, audio_out_channels=128, audio_patch_size=1,
    audio_patch_size_t=1, audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048,
    audio_scale_factor=4, audio_pos_embed_max_pos=20, audio_sampling_rate=16000, audio_hop_length=160,
    audio_gated_attn=True, audio_cross_attn_mod=True, num_layers=48, activation_fn="gelu-approximate",
    qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=3840,
    attention_bias=True, attention_out_bias=True, rope_theta=10000.0, rope_double_precision=True, causal_offset=1,
    timestep_scale_multiplier=1000, cross_attn_timestep_scale_multiplier=1000, rope_type="split",
    use_prompt_embeddings=False, perturbed_attn=True)
LTX_23_CONNECTORS = dict(
    caption_channels=3840, text_proj_in_factor=49, video_connector_num_attention_heads=32,
    video_connector_attention_head_dim=128, video_connector_num_layers=8, video_connector_num_learnable_registers=128,
    video_gated_attn=True, audio_connector_num_attention_heads=32, audio_connector_attention_head_dim=64,
    audio_connector_num_layers=8, audio_connector_num_learnable_registers=128, audio_gated_attn=True,
    connector_rope_base_seq_len=4096, rope_theta=10000.0, rope_double_precision=True,
    causal_temporal_positioning=False, rope_type="split", per_modality_projections=True, video_hidden_dim=4096,
    audio_hidden_dim=2048, proj_bias=True)
LTX_23_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=128, block_out_channels=(256, 512, 1024, 1024),
    down_block_types=("LTX2VideoDownBlock3D",) * 4, decoder_block_out_channels=(256, 512, 512, 1024),
    layers_per_block=(4, 6, 4, 2, 2), decoder_layers_per_block=(4, 6, 4, 2, 2),
    spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True, True),
    decoder_inject_noise=(False, False, False, False, False),
    downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
    upsample_type=("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
    upsample_residual=(False, False, False, False), upsample_factor=(2, 2, 1, 2), timestep_conditioning=False,
    patch_size=4, patch_size_t=1, resnet_norm_eps=1e-6, encoder_causal=True, decoder_causal=False,
    encoder_spatial_padding_mode="zeros", decoder_spatial_padding_mode="zeros", spatial_compression_ratio=32,
    temporal_compression_ratio=8)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        # the LTX-2.3 layout (gated attention, prompt modulation, split rotary, text straight from the connectors)
        # at toy size on the pixel codec of Wan's tiny preset (48 channels, 4x): width 256 and a 2x2 patch like the
        # other tiny presets (192 = 48 x 2 x 2 values a token), the audio stream at its smallest; the text width is
        # the model's, as the release's connectors give it (its prompt modulation needs it). The rotary
        # embedding's scale is set for toy clips as the release's is for its own: coordinates in [0, 1] over a 32x32
        # frame (4x the 8x8 latent) and one second (pos_embed_max_pos in seconds; the rollout goes past it)
        "transformer": dict(
            in_channels=192, out_channels=192, patch_size=2, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=64, cross_attention_dim=256, vae_scale_factors=(1, 4, 4), pos_embed_max_pos=1,
            base_height=32, base_width=32, gated_attn=True, cross_attn_mod=True, audio_in_channels=8,
            audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=16,
            audio_cross_attention_dim=32,
            audio_gated_attn=True, audio_cross_attn_mod=True, num_layers=4, rope_type="split",
            use_prompt_embeddings=False, perturbed_attn=True),
        "codec": {"kind": "pixel", "spatial_factor": 4},
    },
    "ltx-2.3-22b": {"transformer": LTX_23_TRANSFORMER, "codec": {"kind": "vae", "vae": LTX_23_VAE},
                    "connectors": LTX_23_CONNECTORS},
}


class LTXOptions(BackboneOptions):
    FAMILY: ClassVar[str] = "LTX-2.3"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    SHAPE_KEYS: ClassVar[tuple[str, ...]] = (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "patch_size",
        "patch_size_t", "cross_attention_dim", "caption_channels", "audio_num_attention_heads",
        "audio_attention_head_dim", "audio_cross_attention_dim", "gated_attn", "cross_attn_mod",
        "use_prompt_embeddings")
    PART_NAMES: ClassVar[dict[str, str]] = {
        "vae": "VAE", "text_encoder": "Gemma 3 text encoder (a byte stand-in)", "tokenizer": "Gemma 3 tokenizer",
        "connectors": "LTX-2 text connectors (a byte stand-in)"}

    preset: Literal["tiny", "ltx-2.3-22b"] = Field(
        "tiny", description="model size: tiny (tests and the toy lab: CPU, pixel codec) or the published LTX-2.3")
    weights: InputDir | None = Field(
        None, description="local diffusers-format directory (transformer/, vae/, text_encoder/, tokenizer/, "
                          "connectors/); for tiny, a directory saved by `save_pretrained` of the transformer")
    text_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype Gemma 3 and the text connectors load in (their embeddings are float32)")
    frame_rate: float = Field(24.0, gt=0, description="video frames per second: the rotary embedding's time axis "
                              "is in seconds (the pipeline's frame_rate)")
    decode_context: int = Field(16, ge=1, description="latent frames of the rollout so far that streaming decode "
                                "re-decodes before each chunk (the VAE decoder keeps no cache)")

    def frame_geometry(self) -> tuple[int, int]:
        """(video frames per latent frame, the number frame height and width must be multiples of)."""
        codec, patch = PRESETS[self.preset]["codec"], self.transformer_config()["patch_size"]
        if codec["kind"] == "pixel":
            return 1, codec["spatial_factor"] * patch
        return codec["vae"]["temporal_compression_ratio"], codec["vae"]["spatial_compression_ratio"] * patch


def _pipeline() -> Any:
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline

    return LTX2Pipeline


# -- blocks ---------------------------------------------------------------------------------------
def _attention_features(blk: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """An LTX2VideoTransformerBlock's video queries and keys of ``tokens`` [B, L, D] (its method)."""
    attn = blk.attn1
    x = blk.norm1(tokens.to(attn.to_q.weight.dtype))  # the block's pre-attention norm, without modulation
    q, k = attn.norm_q(attn.to_q(x)), attn.norm_k(attn.to_k(x))
    return q.unflatten(-1, (attn.heads, -1)), k.unflatten(-1, (attn.heads, -1))


class WindowBlock(nn.Module):
    """One of diffusers' LTX2VideoTransformerBlock, run on the video stream alone: the audio stream is a
    stand-in of one zero token and the audio-video cross-attention is off both ways, so the video output
    does not depend on it. Returns (video, audio) as the block does."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.audio_mods, self.audio_dim = block.audio_scale_shift_table.shape
        self.audio_text_dim = block.audio_attn2.cross_attention_dim

    def forward(self, hidden: Tensor, text: Tensor, temb: Tensor, temb_prompt: Tensor | None, text_mask: Tensor,
                rotary: tuple[Tensor, Tensor], self_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        b = hidden.shape[0]
        return self.block(
            hidden_states=hidden, audio_hidden_states=hidden.new_zeros(b, 1, self.audio_dim),
            encoder_hidden_states=text, audio_encoder_hidden_states=hidden.new_zeros(b, 1, self.audio_text_dim),
            temb=temb, temb_audio=hidden.new_zeros(b, 1, self.audio_mods * self.audio_dim),
            temb_ca_scale_shift=None, temb_ca_audio_scale_shift=None, temb_ca_gate=None, temb_ca_audio_gate=None,
            temb_prompt=temb_prompt, video_rotary_emb=rotary, encoder_attention_mask=text_mask,
            self_attention_mask=self_mask, use_a2v_cross_attention=False, use_v2a_cross_attention=False)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean (True: attend) mask as the additive bias diffusers' LTX-2 forward makes of its masks."""
    return (1 - mask.to(dtype)) * -10000.0


# -- codec ----------------------------------------------------------------------------------------
class LTXVAECodec(ContextVAECodec):
    """AutoencoderKLLTX2Video with the pipeline's per-channel latent normalisation; frozen. Its decoder is
    not causal: streaming decode gives each chunk as decoding the rollout so far (its last
    ``decode_context`` latent frames) would, without the frames after it."""

    def __init__(self, vae: nn.Module, decode_context: int = 16):
        cfg = vae.config
        super().__init__(vae, cfg.spatial_compression_ratio, cfg.temporal_compression_ratio, cfg.latent_channels,
                         decode_context)

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        vae = self.vae
        z = vae.encode(frames.to(vae.dtype)).latent_dist.mode().float()
        return _pipeline()._normalize_latents(z, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        z = _pipeline()._denormalize_latents(latents.float(), vae.latents_mean, vae.latents_std,
                                             vae.config.scaling_factor).to(vae.dtype)
        # the pipeline's decode timestep (0, no decode noise) for a timestep-conditioned decoder
        temb = z.new_zeros(z.shape[0]) if vae.config.timestep_conditioning else None
        return vae.decode(z, temb).sample.float().clamp(-1, 1)


# -- text -----------------------------------------------------------------------------------------
class GemmaConnectors(nn.Module):
    """Gemma 3 run by the pipeline's own prompt encoding (every hidden state, left-padded to ``max_length``),
    then LTX-2's text connectors: the video stream's embeddings and mask."""

    def __init__(self, tokenizer: Any, gemma: nn.Module, connectors: nn.Module, max_length: int = 1024):
        super().__init__()
        self.tokenizer = tokenizer
        self.gemma = gemma.requires_grad_(False).eval()
        self.connectors = connectors.requires_grad_(False).eval()
        self.max_length = max_length

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEncoding:
        device = next(self.connectors.parameters()).device
        pipe = SimpleNamespace(tokenizer=self.tokenizer, text_encoder=self.gemma)
        embeds, mask = _pipeline()._get_gemma_prompt_embeds(pipe, prompts, max_sequence_length=self.max_length,
                                                            device=device)
        video, _audio, mask = self.connectors(embeds.to(self.connectors.dtype), mask, padding_side="left")
        return TextEncoding(video, mask.bool())


class LTXTextEncoder(CachedTextEncoders):
    """Gemma 3 through LTX-2's connectors (``"gemma"``), or a byte stand-in of their width; cached per prompt."""

    NAMES: ClassVar[tuple[str, ...]] = ("gemma",)

    def __init__(self, gemma: nn.Module, cache_size: int = 64):
        super().__init__(cache_size)
        self.gemma = gemma

    @classmethod
    def from_weights(cls, root: Path, dtype: torch.dtype) -> LTXTextEncoder:
        """From ``tokenizer/``, ``text_encoder/`` and ``connectors/`` of a diffusers-format LTX-2.3 directory."""
        import transformers
        from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
        gemma = transformers.Gemma3ForConditionalGeneration.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        connectors = LTX2TextConnectors.from_pretrained(root / "connectors", torch_dtype=dtype)
        return cls(GemmaConnectors(tokenizer, gemma, connectors))


# -- the backbone ---------------------------------------------------------------------------------
class LTXBackbone(DiffusersBackbone):
    """The Backbone protocol over the video stream of a diffusers LTX2VideoTransformer3DModel. Its text
    conditioning has one encoder, ``TEXT_ENCODER`` (Gemma 3 through the connectors, or a byte stand-in)."""

    TEXT_ENCODER = "gemma"

    def __init__(self, transformer: nn.Module, codec: nn.Module, text_encoder: nn.Module, preset: str,
                 frame_rate: float = 24.0):
        super().__init__(transformer, codec, text_encoder, preset)
        cfg = transformer.config
        self.patch_size = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        values = cfg.patch_size_t * cfg.patch_size**2
        self.latent_channels = cfg.in_channels // values
        if cfg.in_channels != codec.latent_channels * values or cfg.out_channels != cfg.in_channels:
            raise BackboneConfigError(
                f"transformer in_channels={cfg.in_channels}, out_channels={cfg.out_channels} do not fit the codec's "
                f"{codec.latent_channels} latent channels in {self.patch_size} patches")
        self.frame_rate = frame_rate
        # a plain list: the blocks' parameters belong to the transformer (one copy in every state dict)
        self._window_blocks = [WindowBlock(block) for block in transformer.transformer_blocks]
        attach_block_method(transformer.transformer_blocks, ATTENTION_FEATURES, _attention_features)

    # -- Backbone protocol (the rest: DiffusersBackbone) -------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_in.weight.dtype

    def patch_embed(self, latents: Tensor) -> Tensor:
        """The pipeline's packing, then ``proj_in``, back on the token grid [B, D, F', h', w']."""
        pt, p, _ = self.patch_size
        _, _, f, h, w = latents.shape
        tokens = self.transformer.proj_in(_pipeline()._pack_latents(latents.to(self.dtype), p, pt))
        return tokens.transpose(1, 2).unflatten(2, (f // pt, h // p, w // p))

    @property
    def patch_embedding(self) -> nn.Conv3d:
        """``proj_in`` as the convolution it is on unpacked latents (the pipeline packs each patch's values
        channel-major), a copy for compressors to derive their coarser kernels from."""
        proj, (pt, p, _) = self.transformer.proj_in, self.patch_size
        conv = nn.Conv3d(self.latent_channels, proj.out_features, (pt, p, p), (pt, p, p), bias=proj.bias is not None,
                         device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(proj.weight.view(conv.weight.shape))
            if proj.bias is not None:
                conv.bias.copy_(proj.bias)
        return conv

    def attention_features(self, tokens: Tensor, block: int = 0) -> tuple[Tensor, Tensor]:
        return getattr(self.transformer.transformer_blocks[block], ATTENTION_FEATURES)(tokens)

    def video_coords(self, positions: Tensor) -> Tensor:
        """[1, 3, L, 2] pixel-space [start, end) bounds of the tokens at (frame, row, col) ``positions`` [L, 3]
        (latent-patch units), the time axis in seconds: what diffusers' ``prepare_video_coords`` gives for
        a grid, at any position."""
        rope = self.transformer.rope
        patch = torch.tensor(self.patch_size, dtype=torch.float32, device=positions.device)[:, None]
        start = positions.to(torch.float32).T * patch  # [3, L] in latent units
        pixels = torch.stack([start, start + patch], dim=-1) * torch.tensor(
            rope.scale_factors, device=positions.device).view(3, 1, 1)
        frames = (pixels[0] + rope.causal_offset - rope.scale_factors[0]).clamp(min=0)  # the VAE's causal first frame
        return torch.cat([(frames / self.frame_rate)[None], pixels[1:]])[None]

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """diffusers' video rotary embedding (cos, sin) for one sample, at any (frame, row, col) positions."""
        return self.transformer.rope(self.video_coords(positions))

    def text_states(self, text: TextConditioning) -> tuple[Tensor, Tensor]:
        """The text tokens the blocks cross-attend [B, T, D_text] and their mask [B, T]."""
        if set(text.names) != {self.TEXT_ENCODER}:
            raise ValueError(f"LTXBackbone: text conditioning from encoders {', '.join(map(repr, text.names))}, "
                             f"expected only {self.TEXT_ENCODER!r} (as LTXBackbone.encode_text makes it)")
        enc = text[self.TEXT_ENCODER]
        states = enc.embeds.to(self.dtype)
        if self.transformer.config.use_prompt_embeddings:  # LTX-2.0: a projection in the transformer
            states = self.transformer.caption_projection(states)
        return states, enc.mask

    def run_blocks(self, tokens: Tensor, timesteps: Tensor, text: TextConditioning, rotary: Any,
                   attention_mask: Tensor | None = None, modulation: Tensor | None = None) -> BlockOutput:
        tr = self.transformer
        batch, length = timesteps.shape
        dtype = self.dtype
        time_embed = tr.time_embed
        emb = time_embed.emb(timesteps.flatten(), resolution=None, aspect_ratio=None, batch_size=batch,
                             hidden_dtype=dtype).unflatten(0, (batch, length))
        if modulation is not None:  # control joins the timestep embedding before its projection
            emb = emb + modulation.to(emb.dtype)
        temb = time_embed.linear(time_embed.silu(emb))
        temb_prompt = None
        if tr.prompt_modulation and tr.config.use_prompt_adaln_single:  # LTX-2.3: one noise level per sample
            temb_prompt = tr.prompt_adaln(timesteps.amax(dim=1), batch_size=batch, hidden_dtype=dtype)[0][:, None]
        text_hidden, text_mask = self.text_states(text)
        text_bias = additive_mask(text_mask, dtype)[:, None]
        self_bias = None if attention_mask is None else additive_mask(attention_mask, dtype)[None].expand(batch, -1, -1)
        rotary = tuple(r.expand(batch, *r.shape[1:]) for r in rotary)  # the split rotary reshapes by its batch
        hidden = tokens.to(dtype)
        for block in self._window_blocks:
            hidden, _ = self.run_block(block, hidden, text_hidden, temb, temb_prompt, text_bias, rotary, self_bias)
        return BlockOutput(hidden=hidden, temb=emb)

    def unembed(self, out: BlockOutput, grid: tuple[int, int, int]) -> Tensor:
        tr = self.transformer
        shift, scale = (tr.scale_shift_table[None, None] + out.temb[:, :, None]).unbind(2)
        hidden = tr.proj_out(tr.norm_out(out.hidden) * (1 + scale) + shift)
        pt, p, _ = self.patch_size
        return _pipeline()._unpack_latents(hidden, *grid, p, pt).float()

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks in order, as run on a window: each returns (video, audio stand-in)."""
        return self._window_blocks

    def shard_units(self) -> list[nn.Module]:
        """What FSDP2 shards as units: diffusers' blocks (in the model; each window block calls its own)."""
        return list(self.transformer.transformer_blocks)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextConditioning:
        return self.text_encoder(prompts)


def build_ltx(options: LTXOptions, **_: Any) -> LTXBackbone:
    from diffusers import AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel

    transformer = options.build_transformer(LTX2VideoTransformer3DModel)
    cfg = transformer.config
    codec = options.build_codec(LTXVAECodec, AutoencoderKLLTX2Video, decode_context=options.decode_context)
    if not options.pixel_codec and not {"text_encoder", "tokenizer", "connectors"} & set(options.missing_parts()):
        text_encoder = load_text_encoders_once("ltx", Path(options.weights), DTYPES[options.text_dtype],
                                               LTXTextEncoder.from_weights)
    else:  # random-weight runs and the tiny preset: a stand-in of the width the blocks cross-attend
        width = cfg.caption_channels if cfg.use_prompt_embeddings else cfg.cross_attention_dim
        text_encoder = LTXTextEncoder(ByteTextEncoder(width, max_length=16))
    backbone = LTXBackbone(transformer, codec, text_encoder, options.preset, options.frame_rate)
    backbone.random_parts = options.random_parts()  # printed by the runner: random parts only with random_init
    return backbone

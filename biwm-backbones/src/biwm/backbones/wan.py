"""Wan2.1 / Wan2.2 through diffusers' WanTransformer3DModel and AutoencoderKLWan.

The adapter reuses the diffusers module's own submodules and weights (patch embedding, rotary
frequencies, condition embedder, blocks, output norm/projection) and only re-composes them so a
window can carry history tokens, fractional positions, per-token timesteps and control
embeddings. Nothing of the model is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from biwm.core.config import InputDir
from biwm.core.protocols import BlockOutput
from biwm.core.sharded import ATTENTION_FEATURES  # the block method packforcing scores with
from biwm.core.text import TextConditioning, TextEncoding

from biwm.backbones.codecs import ByteTextEncoder, PixelCodec
from biwm.backbones.common import (DTYPES, BackboneConfigError, BackboneOptions, DiffusersBackbone, MaskableProcessor,
                                    cast_like_from_pretrained, channels_last_conv3d, transformer_dir,
                                    attach_block_method)

# Exact published shapes (diffusers-format configs of the Wan-AI releases).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        # width 256 >= the 192 values a token covers (48 channels x 2x2 patch): a narrower model cannot
        # carry the noise through, and v-prediction then leaves residual noise in every sample
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=48,
                            out_channels=48, text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4,
                            rope_max_seq_len=256),
        "codec": {"kind": "pixel", "spatial_factor": 4},
    },
    "toy": {
        # the toy lab's model: 4x4-pixel tokens (patch 1 on the 4x pixel codec), so a token carries 48 values in
        # 256 dims and a sub-token camera move is a change of a few tokens, not of one token's 192 values
        "transformer": dict(patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=64, in_channels=48,
                            out_channels=48, text_dim=32, freq_dim=64, ffn_dim=1024, num_layers=6,
                            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256),
        "codec": {"kind": "pixel", "spatial_factor": 4},
    },
    "wan2.1-t2v-1.3b": {
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "codec": {"kind": "vae", "vae": dict(base_dim=96, z_dim=16, scale_factor_spatial=8, scale_factor_temporal=4)},
    },
    "wan2.2-ti2v-5b": {
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48,
                            out_channels=48, text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        "codec": {"kind": "vae", "vae": dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True,
                                              in_channels=12, out_channels=12, patch_size=2,
                                              scale_factor_spatial=16, scale_factor_temporal=4)},
    },
}


class WanOptions(BackboneOptions):
    FAMILY: ClassVar[str] = "Wan"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                                             "ffn_dim")
    PART_NAMES: ClassVar[dict[str, str]] = {"vae": "VAE", "text_encoder": "text encoder (a byte stand-in)",
                                            "tokenizer": "tokenizer"}

    preset: Literal["tiny", "toy", "wan2.1-t2v-1.3b", "wan2.2-ti2v-5b"] = Field(
        "tiny", description="model size: tiny (tests: CPU, pixel codec), toy (the toy lab's model, pixel codec) or "
                            "a published Wan release")
    weights: InputDir | None = Field(
        None, description="local diffusers-format directory (transformer/, vae/, text_encoder/, tokenizer/); "
                          "for tiny, a directory saved by `save_pretrained` of the transformer")

    def frame_geometry(self) -> tuple[int, int]:
        """(video frames per latent frame, the number frame height and width must be multiples of:
        the codec's spatial factor times the patch size)."""
        codec = PRESETS[self.preset]["codec"]
        patch = tuple(self.transformer_config()["patch_size"])
        if codec["kind"] == "pixel":
            return 1, codec["spatial_factor"] * max(patch[1:])
        return codec["vae"]["scale_factor_temporal"], codec["vae"]["scale_factor_spatial"] * max(patch[1:])


def rotate_pairs(x: Tensor, freqs_cos: Tensor, freqs_sin: Tensor) -> Tensor:
    """Wan's rotary embedding of ``x`` [B, L, heads, head_dim] (rotating interleaved pairs), as diffusers'
    WanAttnProcessor computes it (the same operations, so the same values), but written as one stack of
    the rotated pairs instead of two strided writes into an empty tensor: inductor fuses the strided writes
    into a masked, modulo-indexed reduction kernel that ran at ~2% of memory bandwidth on the H200
    (0.66 ms for 28672 x 256 values), the largest kernel of a toy-lab training step."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class MaskableWanAttnProcessor(MaskableProcessor):
    """diffusers' WanAttnProcessor for self-attention, plus an attention mask set per window (the blocks
    pass none). With rotary embeddings (self-attention) it re-composes the processor from diffusers' own
    projections, norms and attention dispatcher, applying the rotary with :func:`rotate_pairs`; anything
    else (image-context cross-attention) goes to diffusers' processor unchanged."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        super().__init__(WanAttnProcessor())

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        mask = self.mask if attention_mask is None else attention_mask
        if rotary_emb is None or attn.add_k_proj is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = rotate_pairs(attn.norm_q(query).unflatten(2, (attn.heads, -1)), *rotary_emb)
        key = rotate_pairs(attn.norm_k(key).unflatten(2, (attn.heads, -1)), *rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))
        out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend,
                                    parallel_config=self._parallel_config if encoder_hidden_states is None else None)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanVAECodec(nn.Module):
    """AutoencoderKLWan with Wan's latent normalisation; frozen."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        cfg = vae.config
        self.spatial_factor = cfg.scale_factor_spatial
        self.temporal_factor = cfg.scale_factor_temporal
        self.latent_channels = cfg.z_dim
        mean, std = list(cfg.latents_mean), list(cfg.latents_std)
        if len(mean) != cfg.z_dim or len(std) != cfg.z_dim:
            # a VAE built from a preset without weights carries diffusers' 16-channel defaults: no
            # normalisation is known for other widths (random-weight speed runs only)
            mean, std = [0.0] * cfg.z_dim, [1.0] * cfg.z_dim
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1), persistent=False)

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        z = self.vae.encode(frames.to(self.vae.dtype)).latent_dist.mode()
        return (z.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = (latents.float() * self.std + self.mean).to(self.vae.dtype)
        return self.vae.decode(z).sample.float()

    def stream_decoder(self) -> "WanStreamDecoder":
        return WanStreamDecoder(self)

    def channels_last_decoder(self) -> None:
        """The decoder's Conv3d weights in channels-last (NDHWC) layout: cuDNN's bf16 kernels then
        produce channels-last activations instead of transposing before and after each convolution
        (the Conv2d of the spatial upsamplers keep their layout)."""
        channels_last_conv3d(self.vae.decoder)

    def compile_decoder(self, **kwargs: Any) -> None:
        """torch.compile the decoder's one-latent-frame step, the unit streaming decode runs: one graph
        per frame-cache state (first frame, second frame, every later frame) on torch >= 2.13. Older
        dynamo (2.11) breaks the graph at diffusers' ``tensor == "Rep"`` test in WanResample and
        compiles the pieces separately, settling after the first full rollout."""
        self.vae.decoder.compile(**kwargs)


class WanStreamDecoder:
    """Decodes a rollout chunk by chunk, keeping the VAE's causal-conv caches between chunks so the
    result equals decoding the whole video at once (AutoencoderKLWan's own frame loop, not reset)."""

    def __init__(self, codec: WanVAECodec):
        self.codec = codec
        self.started = False

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        vae = self.codec.vae
        if not self.started:
            vae.clear_cache()
        z = (latents.float() * self.codec.std + self.codec.mean).to(vae.dtype)
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):  # the VAE decoder is causal over latent frames
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=not self.started))
            self.started = True
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1, 1).float()


class UMT5TextEncoder(nn.Module):
    """Wan's UMT5 text encoder (a transformers tokenizer and ``UMT5EncoderModel``); frozen. Its
    output's mask is the tokenizer's attention mask (the backbone zeroes the padding it marks)."""

    def __init__(self, tokenizer: Any, encoder: nn.Module, max_length: int = 512):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.requires_grad_(False).eval()
        self.max_length = max_length

    @classmethod
    def from_weights(cls, weights: Path, max_length: int = 512) -> UMT5TextEncoder:
        """From the ``tokenizer/`` and ``text_encoder/`` folders of a diffusers-format Wan directory."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        return cls(AutoTokenizer.from_pretrained(weights / "tokenizer"),
                   UMT5EncoderModel.from_pretrained(weights / "text_encoder"), max_length)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEncoding:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.encoder.parameters()).device
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        return TextEncoding(self.encoder(ids, mask).last_hidden_state, mask.bool())


def _attention_features(blk: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """A WanTransformerBlock's queries and keys of ``tokens`` [B, L, D] (its method; see ``attention_features``)."""
    attn = blk.attn1
    x = blk.norm1(tokens.float()).type_as(tokens)  # the block's pre-attention norm, without modulation
    q = attn.norm_q(attn.to_q(x)) if attn.norm_q is not None else attn.to_q(x)
    k = attn.norm_k(attn.to_k(x)) if attn.norm_k is not None else attn.to_k(x)
    return q.unflatten(-1, (attn.heads, -1)), k.unflatten(-1, (attn.heads, -1))


class WanBackbone(DiffusersBackbone):
    """The Backbone protocol over a diffusers WanTransformer3DModel. Its text conditioning has one
    encoder, ``TEXT_ENCODER`` (UMT5, or the byte stand-in of the pixel-codec presets)."""

    TEXT_ENCODER = "t5"

    def __init__(self, transformer: nn.Module, codec: nn.Module, text_encoder: nn.Module, preset: str):
        super().__init__(transformer, codec, text_encoder, preset)
        cfg = transformer.config
        self.latent_channels = cfg.in_channels
        self.patch_size = tuple(cfg.patch_size)
        if codec.latent_channels != cfg.in_channels:
            raise BackboneConfigError(f"transformer in_channels={cfg.in_channels} does not match the codec's "
                                      f"{codec.latent_channels} latent channels")
        self.install_processors([block.attn1 for block in transformer.blocks], MaskableWanAttnProcessor)
        attach_block_method(transformer.blocks, ATTENTION_FEATURES, _attention_features)

    # -- Backbone protocol (the rest: DiffusersBackbone) -------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    def patch_embed(self, latents: Tensor) -> Tensor:
        return self.transformer.patch_embedding(latents.to(self.dtype))

    @property
    def patch_embedding(self) -> nn.Conv3d:
        return self.transformer.patch_embedding

    def attention_features(self, tokens: Tensor, block: int = 0) -> tuple[Tensor, Tensor]:
        return getattr(self.transformer.blocks[block], ATTENTION_FEATURES)(tokens)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rope = self.transformer.rope
        cos, sin = [], []
        for axis, dim in enumerate((rope.t_dim, rope.h_dim, rope.w_dim)):
            c, s = get_1d_rotary_pos_embed(dim, positions[:, axis].to(torch.float64), use_real=True,
                                           repeat_interleave_real=True, freqs_dtype=torch.float64)
            cos.append(c)
            sin.append(s)
        return torch.cat(cos, -1)[None, :, None], torch.cat(sin, -1)[None, :, None]

    def text_embeds(self, text: TextConditioning) -> Tensor:
        """The embeddings the condition embedder takes, [B, L, text_dim] in the model's dtype, zero where
        the mask is False: diffusers' Wan cross-attention takes no mask, and Wan's own pipeline zeroes
        the embeddings past each prompt's length."""
        if set(text.names) != {self.TEXT_ENCODER}:
            raise ValueError(f"WanBackbone: text conditioning from encoders {', '.join(map(repr, text.names))}, "
                             f"expected only {self.TEXT_ENCODER!r} (as WanBackbone.encode_text makes it)")
        enc = text[self.TEXT_ENCODER]
        return enc.embeds.to(self.dtype).masked_fill(~enc.mask[..., None], 0)

    def run_blocks(self, tokens: Tensor, timesteps: Tensor, text: TextConditioning, rotary: Any,
                   attention_mask: Tensor | None = None, modulation: Tensor | None = None) -> BlockOutput:
        tr = self.transformer
        batch, length = timesteps.shape
        embedder = tr.condition_embedder
        temb, proj, text_states, _ = embedder(timesteps.flatten(), self.text_embeds(text), None,
                                              timestep_seq_len=length)
        if modulation is not None:  # control joins the timestep embedding before its projection
            temb = temb + modulation.to(temb.dtype)
            proj = embedder.time_proj(embedder.act_fn(temb))
        proj = proj.unflatten(2, (6, -1))
        hidden = tokens.to(self.dtype)
        with self.window_mask(attention_mask):
            for block in tr.blocks:
                hidden = self.run_block(block, hidden, text_states, proj, rotary)
        return BlockOutput(hidden=hidden, temb=temb)

    def unembed(self, out: BlockOutput, grid: tuple[int, int, int]) -> Tensor:
        tr = self.transformer
        shift, scale = (tr.scale_shift_table.unsqueeze(0) + out.temb.unsqueeze(2)).chunk(2, dim=2)
        hidden = (tr.norm_out(out.hidden.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(out.hidden)
        hidden = tr.proj_out(hidden)
        f, h, w = grid
        pt, ph, pw = self.patch_size
        hidden = hidden.reshape(hidden.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()

    def block_modules(self) -> nn.ModuleList:
        """The transformer blocks in order (losses that read hidden states hook them)."""
        return self.transformer.blocks

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextConditioning:
        enc = self.text_encoder(prompts)
        return TextConditioning({self.TEXT_ENCODER: TextEncoding(enc.embeds.float(), enc.mask)})


def build_wan(options: WanOptions, **_: Any) -> WanBackbone:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    preset = PRESETS[options.preset]
    dtype = DTYPES[options.dtype]
    if options.weights is not None:
        transformer = WanTransformer3DModel.from_pretrained(transformer_dir(Path(options.weights), "Wan"),
                                                           torch_dtype=dtype)
    else:
        transformer = cast_like_from_pretrained(WanTransformer3DModel(**options.transformer_config()), dtype)
    if options.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    codec_cfg = preset["codec"]
    if codec_cfg["kind"] == "pixel":
        codec: nn.Module = PixelCodec(codec_cfg["spatial_factor"])
        text_encoder: nn.Module = ByteTextEncoder(transformer.config.text_dim)
    else:
        weights = Path(options.weights) if options.weights is not None else None
        if weights is not None and (weights / "vae" / "config.json").is_file():
            vae = AutoencoderKLWan.from_pretrained(weights / "vae", torch_dtype=dtype)
        else:
            vae = AutoencoderKLWan(**codec_cfg["vae"]).to(dtype)
        codec = WanVAECodec(vae)
        if weights is not None and (weights / "text_encoder").is_dir():
            text_encoder = UMT5TextEncoder.from_weights(weights)
        else:  # random-weight runs: a stand-in of the right width; text is encoded once per prompt anyway
            text_encoder = ByteTextEncoder(transformer.config.text_dim, max_length=512)
    backbone = WanBackbone(transformer, codec, text_encoder, options.preset)
    if codec_cfg["kind"] != "pixel":  # printed by the runner: random parts only come with random_init
        backbone.random_parts = (["transformer"] if options.weights is None else []) + [
            options.PART_NAMES[p] for p in options.missing_parts() if p != "tokenizer"]
    return backbone

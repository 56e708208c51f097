"""HunyuanVideo-1.5 through diffusers' HunyuanVideo15Transformer3DModel and AutoencoderKLHunyuanVideo15.

diffusers' forward takes one timestep per sample and builds rotary positions from 0, so the adapter
re-composes the model from its own submodules (patch embedding, time embedding, token refiner, ByT5
projection, condition-type embedding, dual-stream blocks, output norm/projection), as the Wan adapter
does: per-token timesteps reach each block's AdaLN-Zero by running diffusers' ``norm1`` with one token
per row, and rotary frequencies come from diffusers' own ``get_1d_rotary_pos_embed`` at any (also
fractional) position. The text stream (Qwen2.5-VL through the token refiner, ByT5 through its
projection) is modulated per sample, by the sample's highest timestep: the chunk being generated (a
window's history is cleaner, timestep 0 or its noise level). Text-to-video only: the image stream of
image-to-video (SigLIP) is left out, as the t2v pipeline leaves it out (all its tokens masked), and the
patch embedding's conditioning channels (a clean first frame and its mask) are zero, as in the t2v
pipeline.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from biwm.core.checkpoint import read_json_object
from biwm.core.config import InputDir
from biwm.core.protocols import BlockOutput
from biwm.core.sharded import ATTENTION_FEATURES, WINDOW_FORWARD  # the block methods other than forward
from biwm.core.text import TextConditioning, TextEncoding

from biwm.backbones.codecs import ByteTextEncoder
from biwm.backbones.common import (DTYPES, BackboneConfigError, BackboneOptions, CachedTextEncoders, ContextVAECodec,
                                    DiffusersBackbone, MaskableProcessor, load_text_encoders_once,
                                    attach_block_method)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        # the real class at toy size on the pixel codec of Wan's tiny preset (48 latent channels, 4x), so the
        # two families see the same latents: 97 input channels = latents + t2v's zero conditioning latents + mask,
        # the layout of the release's 65 = 32 + 32 + 1; width 256 and a 2x2 patch like Wan's tiny
        "transformer": dict(in_channels=97, out_channels=48, num_attention_heads=4, attention_head_dim=64,
                            num_layers=4, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                            text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=32, rope_axes_dim=(16, 24, 24),
                            task_type="t2v"),
        "codec": {"kind": "pixel", "spatial_factor": 4},
    },
    "hunyuanvideo-1.5-480p": {
        # The 480p text-to-video transformer of tencent/HunyuanVideo-1.5 as diffusers converts it
        # (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v): diffusers'
        # scripts/convert_hunyuan_video1_5_to_diffusers.py builds HunyuanVideo15Transformer3DModel(
        # **TRANSFORMER_CONFIGS["480p_t2v"]) = the class defaults of diffusers 0.42.1 plus target_size=640 and
        # task_type="i2v" (so written there for 480p_t2v); every value is spelled out here. Its VAE is
        # AutoencoderKLHunyuanVideo15() with the class defaults (convert_vae passes none).
        "transformer": dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128,
                            num_layers=54, num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
                            qk_norm="rms_norm", text_embed_dim=3584, text_embed_2_dim=1472, image_embed_dim=1152,
                            rope_theta=256.0, rope_axes_dim=(16, 56, 56), target_size=640, task_type="i2v",
                            use_meanflow=False),
        "codec": {"kind": "vae", "vae": dict(in_channels=3, out_channels=3, latent_channels=32,
                                              block_out_channels=(128, 256, 512, 1024, 1024), layers_per_block=2,
                                              spatial_compression_ratio=16, temporal_compression_ratio=4,
                                              downsample_match_channel=True, upsample_match_channel=True,
                                              scaling_factor=1.03682)},
    },
}
class HunyuanOptions(BackboneOptions):
    FAMILY: ClassVar[str] = "HunyuanVideo-1.5"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    SHAPE_KEYS: ClassVar[tuple[str, ...]] = (
        "num_layers", "num_refiner_layers", "num_attention_heads", "attention_head_dim", "in_channels",
        "out_channels", "mlp_ratio", "patch_size", "patch_size_t", "text_embed_dim", "text_embed_2_dim",
        "rope_axes_dim")
    PART_NAMES: ClassVar[dict[str, str]] = {
        "vae": "VAE", "text_encoder": "Qwen2.5-VL text encoder (a byte stand-in)", "tokenizer": "Qwen2.5-VL tokenizer",
        "text_encoder_2": "ByT5 text encoder (a byte stand-in)", "tokenizer_2": "ByT5 tokenizer"}

    preset: Literal["tiny", "hunyuanvideo-1.5-480p"] = Field(
        "tiny", description="model size: tiny (tests and the toy lab: CPU, pixel codec) or the published 480p release")
    weights: InputDir | None = Field(
        None, description="local diffusers-format directory (transformer/, vae/, text_encoder/, tokenizer/, "
                          "text_encoder_2/, tokenizer_2/); for tiny, a directory saved by `save_pretrained` of the "
                          "transformer")
    text_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the Qwen2.5-VL and ByT5 encoders load in (their embeddings are float32)")
    decode_context: int = Field(16, ge=1, description="latent frames of the rollout so far that streaming decode "
                                "re-decodes before each chunk (the VAE decoder keeps no cache): exact while the "
                                "rollout is no longer")

    def frame_geometry(self) -> tuple[int, int]:
        """(video frames per latent frame, the number frame height and width must be multiples of)."""
        codec, config = PRESETS[self.preset]["codec"], self.transformer_config()
        if codec["kind"] == "pixel":
            return 1, codec["spatial_factor"] * config["patch_size"]
        vae = codec["vae"]
        return vae["temporal_compression_ratio"], vae["spatial_compression_ratio"] * config["patch_size"]


# -- attention ------------------------------------------------------------------------------------
class WindowAttnProcessor(MaskableProcessor):
    """diffusers' HunyuanVideo15AttnProcessor2_0, plus a window attention mask set per window.

    Without one (bidirectional windows) it is diffusers' processor. diffusers' processor builds its mask
    from the text mask alone, so a window mask (the causal baseline's [L, L] over the video tokens) runs
    the same projections under one joint mask: video queries see what the window mask lets them and the
    real text tokens; text queries see the real text tokens and the video tokens every video query may
    see (so no information reaches the text stream that a video token could not see)."""

    def __init__(self) -> None:
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        super().__init__(HunyuanVideo15AttnProcessor2_0())

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.mask is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x: Tensor) -> Tensor:
            return x.unflatten(2, (attn.heads, -1))

        query, key = attn.norm_q(heads(attn.to_q(hidden_states))), attn.norm_k(heads(attn.to_k(hidden_states)))
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_query = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
        text_key = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
        query, key = torch.cat([query, text_query], 1), torch.cat([key, text_key], 1)
        value = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], 1)
        out = dispatch_attention_fn(query, key, value, attn_mask=self.joint_mask(attention_mask.bool()), dropout_p=0.0,
                                    is_causal=False, backend=self._attention_backend,
                                    parallel_config=self._parallel_config).flatten(2, 3).to(query.dtype)
        video, text = out.split([hidden_states.shape[1], encoder_hidden_states.shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](video)), attn.to_add_out(text)

    def joint_mask(self, text_mask: Tensor) -> Tensor:
        """[B, 1, L+T, L+T] bool mask over video then text tokens, from the window's [L, L] and the text's [B, T]."""
        batch, length = text_mask.shape[0], self.mask.shape[0]
        video_keys = self.mask.to(text_mask.device)[None].expand(batch, -1, -1)
        seen_by_all = video_keys.all(dim=1, keepdim=True) & text_mask[:, :, None]  # [B, T, L]
        text_keys = text_mask[:, None, :]
        rows = torch.cat([torch.cat([video_keys, text_keys.expand(-1, length, -1)], 2),
                          torch.cat([seen_by_all, text_keys & text_mask[:, :, None]], 2)], 1)
        return rows[:, None]


def _window_forward(blk: nn.Module, hidden: Tensor, text: Tensor, temb: Tensor, text_temb: Tensor, text_mask: Tensor,
                    rotary: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """diffusers' HunyuanVideo15TransformerBlock ``blk`` on a window, re-composed from its own submodules (bound
    to the block as its ``window_forward``; see :class:`WindowBlock`)."""
    b, length, d = hidden.shape
    norm, *mods = blk.norm1(hidden.reshape(b * length, 1, d), emb=temb.reshape(b * length, d))
    gate_msa, shift_mlp, scale_mlp, gate_mlp = (m.view(b, length, d) for m in mods)
    norm_text, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = blk.norm1_context(text, emb=text_temb)
    attn, text_attn = blk.attn(hidden_states=norm.view(b, length, d), encoder_hidden_states=norm_text,
                               attention_mask=text_mask, image_rotary_emb=rotary)
    hidden = hidden + attn * gate_msa
    text = text + text_attn * c_gate_msa.unsqueeze(1)
    hidden = hidden + gate_mlp * blk.ff(blk.norm2(hidden) * (1 + scale_mlp) + shift_mlp)
    norm_text = blk.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    text = text + c_gate_mlp.unsqueeze(1) * blk.ff_context(norm_text)
    return hidden, text


def _attention_features(blk: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """A HunyuanVideo15TransformerBlock's queries and keys of ``tokens`` [B, L, D] (its method)."""
    attn = blk.attn
    x = blk.norm1.norm(tokens.to(attn.to_q.weight.dtype))  # the block's pre-attention norm, without modulation
    q = attn.norm_q(attn.to_q(x).unflatten(-1, (attn.heads, -1)))
    k = attn.norm_k(attn.to_k(x).unflatten(-1, (attn.heads, -1)))
    return q, k


class WindowBlock(nn.Module):
    """One of diffusers' HunyuanVideo15TransformerBlock, run with a timestep embedding per video token
    ([B, L, D]) and one per sample for the text stream ([B, D]); returns (video, text) as the block does.
    The block's own submodules do the work: ``norm1`` (AdaLN-Zero) sees one token per row. The work is
    the block's method ``window_forward``, so that FSDP2, which shards each diffusers block as a unit and
    gathers its parameters around its forward, gathers them around this too
    (:func:`biwm.core.sharded.register_window_forwards`)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        setattr(block, WINDOW_FORWARD, types.MethodType(_window_forward, block))

    def forward(self, hidden: Tensor, text: Tensor, temb: Tensor, text_temb: Tensor, text_mask: Tensor,
                rotary: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return getattr(self.block, WINDOW_FORWARD)(hidden, text, temb, text_temb, text_mask, rotary)


# -- codec ----------------------------------------------------------------------------------------
class HunyuanVAECodec(ContextVAECodec):
    """AutoencoderKLHunyuanVideo15 with the pipeline's latent scaling; frozen. Its decoder is causal over
    latent frames, so streaming decode equals a full decode while the rollout fits ``decode_context``."""

    def __init__(self, vae: nn.Module, decode_context: int = 16):
        cfg = vae.config
        super().__init__(vae, cfg.spatial_compression_ratio, cfg.temporal_compression_ratio, cfg.latent_channels,
                         decode_context)
        self.scaling_factor = cfg.scaling_factor

    @torch.no_grad()
    def encode(self, frames: Tensor) -> Tensor:
        return self.vae.encode(frames.to(self.vae.dtype)).latent_dist.mode().float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = (latents.float() / self.scaling_factor).to(self.vae.dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


# -- text -----------------------------------------------------------------------------------------
def _mllm_prompt(prompt: str) -> str:
    return prompt or " "  # the pipeline's chat template gives the empty prompt one space


def _glyph_prompt(prompt: str) -> str:
    """What the pipeline gives ByT5: the quoted text of a prompt, formatted (empty: none, all masked)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    return extract_glyph_texts(prompt) or ""


class ByteStandIn(nn.Module):
    """A random-weight stand-in of one of HunyuanVideo-1.5's encoders: the byte embedding of the text the
    pipeline gives that encoder, at its width."""

    def __init__(self, width: int, prepare: Callable[[str], str], max_length: int, seed: int):
        super().__init__()
        self.inner = ByteTextEncoder(width, max_length=max_length, seed=seed)
        self.prepare = prepare

    def forward(self, prompts: list[str]) -> TextEncoding:
        return self.inner([self.prepare(p) for p in prompts])


class PipelineEncoder(nn.Module):
    """One of the release's text encoders run by the diffusers pipeline's own encoding function."""

    def __init__(self, tokenizer: Any, encoder: nn.Module, encode: Callable[..., tuple[Tensor, Tensor]],
                 max_length: int):
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.requires_grad_(False).eval()
        self.encode = encode
        self.max_length = max_length

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEncoding:
        device = next(self.encoder.parameters()).device
        embeds, mask = self.encode(self.tokenizer, self.encoder, prompts, device, self.max_length)
        return TextEncoding(embeds, mask.bool())


class HunyuanTextEncoders(CachedTextEncoders):
    """Qwen2.5-VL (``"mllm"``) and ByT5 (``"byt5"``), each a callable prompts -> TextEncoding, cached per prompt."""

    NAMES: ClassVar[tuple[str, ...]] = ("mllm", "byt5")

    def __init__(self, mllm: nn.Module, byt5: nn.Module, cache_size: int = 64):
        super().__init__(cache_size)
        self.mllm = mllm
        self.byt5 = byt5

    @classmethod
    def stand_ins(cls, mllm_width: int, byt5_width: int) -> HunyuanTextEncoders:
        return cls(ByteStandIn(mllm_width, _mllm_prompt, 16, seed=0),
                   ByteStandIn(byt5_width, _glyph_prompt, 16, seed=1))

    @classmethod
    def from_weights(cls, root: Path, dtype: torch.dtype) -> HunyuanTextEncoders:
        """From ``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/`` of a diffusers-format
        HunyuanVideo-1.5 directory, the encoders in ``dtype``; run as the pipeline runs them (Qwen2.5-VL's
        third-last hidden state after the chat template, 1000 tokens; ByT5 on the quoted text, 256 tokens)."""
        import transformers
        from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline as Pipe

        index = read_json_object(root / "model_index.json", "a diffusers pipeline index") \
            if (root / "model_index.json").is_file() else {}

        def load(part: str) -> nn.Module:
            name = (index.get(part) or [None, None])[1]
            model_class = getattr(transformers, name) if name else transformers.AutoModel
            return model_class.from_pretrained(root / part, torch_dtype=dtype)

        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer", padding_side="right")
        tokenizer_2 = transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2")
        return cls(PipelineEncoder(tokenizer, load("text_encoder"),
                                   lambda tok, enc, p, dev, n: Pipe._get_mllm_prompt_embeds(enc, tok, p, dev, n), 1000),
                   PipelineEncoder(tokenizer_2, load("text_encoder_2"),
                                   lambda tok, enc, p, dev, n: Pipe._get_byt5_prompt_embeds(tok, enc, p, dev, n), 256))


# -- the backbone ---------------------------------------------------------------------------------
class HunyuanBackbone(DiffusersBackbone):
    """The Backbone protocol over a diffusers HunyuanVideo15Transformer3DModel. Its text conditioning has
    two encoders, ``"mllm"`` (Qwen2.5-VL) and ``"byt5"`` (ByT5), or byte stand-ins of their widths."""

    TEXT_ENCODERS = ("mllm", "byt5")

    def __init__(self, transformer: nn.Module, codec: nn.Module, text_encoder: HunyuanTextEncoders, preset: str):
        super().__init__(transformer, codec, text_encoder, preset)
        cfg = transformer.config
        self.latent_channels = cfg.out_channels
        # the patch embedding's other input channels: image-to-video's conditioning latents and mask, zero here
        self.condition_channels = cfg.in_channels - cfg.out_channels
        self.patch_size = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        if codec.latent_channels != cfg.out_channels or self.condition_channels < 0:
            raise BackboneConfigError(f"transformer in_channels={cfg.in_channels}, out_channels={cfg.out_channels} "
                                      f"do not fit the codec's {codec.latent_channels} latent channels")
        self.install_processors([block.attn for block in transformer.transformer_blocks], WindowAttnProcessor)
        attach_block_method(transformer.transformer_blocks, ATTENTION_FEATURES, _attention_features)
        # a plain list: the blocks' parameters belong to the transformer (one copy in every state dict)
        self._window_blocks = [WindowBlock(block) for block in transformer.transformer_blocks]

    # -- Backbone protocol (the rest: DiffusersBackbone) -------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.proj.weight.dtype

    def patch_embed(self, latents: Tensor) -> Tensor:
        x = latents.to(self.dtype)
        if self.condition_channels:
            b, _, f, h, w = x.shape
            x = torch.cat([x, x.new_zeros(b, self.condition_channels, f, h, w)], dim=1)
        return self.transformer.x_embedder.proj(x)

    @property
    def patch_embedding(self) -> nn.Conv3d:
        """The patch embedding of the latent channels alone (what :meth:`patch_embed` computes, the
        conditioning channels being zero): a convolution made from ``x_embedder.proj``'s weights, a copy
        for compressors to derive their coarser kernels from."""
        proj = self.transformer.x_embedder.proj
        if not self.condition_channels:
            return proj
        conv = nn.Conv3d(self.latent_channels, proj.out_channels, proj.kernel_size, proj.stride,
                         bias=proj.bias is not None, device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(proj.weight[:, : self.latent_channels])
            if proj.bias is not None:
                conv.bias.copy_(proj.bias)
        return conv

    def attention_features(self, tokens: Tensor, block: int = 0) -> tuple[Tensor, Tensor]:
        return getattr(self.transformer.transformer_blocks[block], ATTENTION_FEATURES)(tokens)

    def rotary(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin) [L, head_dim] at (frame, row, col) positions, diffusers' HunyuanVideo15RotaryPosEmbed
        at any position (float32 positions, as it builds its integer grid)."""
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rope = self.transformer.rope
        axes = [get_1d_rotary_pos_embed(dim, positions[:, axis].to(torch.float32), rope.theta, use_real=True)
                for axis, dim in enumerate(rope.rope_dim)]
        return torch.cat([c for c, _ in axes], dim=1), torch.cat([s for _, s in axes], dim=1)

    def text_states(self, text: TextConditioning, timestep: Tensor) -> tuple[Tensor, Tensor]:
        """The text stream [B, T, D] and its mask [B, T]: ByT5's tokens then Qwen2.5-VL's (refined at
        ``timestep`` [B]), each plus its condition-type embedding, as diffusers' forward makes them (it
        also reorders real tokens first: attention is blind to the order of the keys)."""
        if set(text.names) != set(self.TEXT_ENCODERS):
            raise ValueError(f"HunyuanBackbone: text conditioning from encoders {', '.join(map(repr, text.names))}, "
                             f"expected {' and '.join(map(repr, self.TEXT_ENCODERS))} (as encode_text makes it)")
        tr = self.transformer
        mllm, byt5 = text["mllm"], text["byt5"]
        kind = tr.cond_type_embed(torch.arange(2, device=timestep.device))  # 0: Qwen2.5-VL, 1: ByT5
        states = tr.context_embedder(mllm.embeds.to(self.dtype), timestep, mllm.mask) + kind[0]
        states_2 = tr.context_embedder_2(byt5.embeds.to(self.dtype)) + kind[1]
        return torch.cat([states_2, states], dim=1), torch.cat([byt5.mask, mllm.mask], dim=1)

    def run_blocks(self, tokens: Tensor, timesteps: Tensor, text: TextConditioning, rotary: Any,
                   attention_mask: Tensor | None = None, modulation: Tensor | None = None) -> BlockOutput:
        tr = self.transformer
        batch, length = timesteps.shape
        embed_dtype = tr.time_embed.timestep_embedder.linear_1.weight.dtype  # the pipeline's timestep dtype
        text_t = timesteps.amax(dim=1)  # the chunk's: the text stream is modulated per sample
        temb = tr.time_embed(timesteps.flatten().to(embed_dtype)).unflatten(0, (batch, length))
        if modulation is not None:
            temb = temb + modulation.to(temb.dtype)
        text_temb = tr.time_embed(text_t.to(embed_dtype))
        text_hidden, text_mask = self.text_states(text, text_t)
        hidden = tokens.to(self.dtype)
        with self.window_mask(attention_mask):
            for block in self._window_blocks:
                hidden, text_hidden = self.run_block(block, hidden, text_hidden, temb, text_temb, text_mask, rotary)
        return BlockOutput(hidden=hidden, temb=temb)

    def unembed(self, out: BlockOutput, grid: tuple[int, int, int]) -> Tensor:
        tr = self.transformer
        b, length, d = out.hidden.shape
        hidden = tr.norm_out(out.hidden.reshape(b * length, 1, d), out.temb.reshape(b * length, d))
        hidden = tr.proj_out(hidden.view(b, length, d))
        f, h, w = grid
        pt, ph, pw = self.patch_size
        hidden = hidden.reshape(b, f, h, w, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3).float()

    def block_modules(self) -> list[nn.Module]:
        """The transformer blocks in order, as run on a window: each returns (video, text) hidden states."""
        return self._window_blocks

    def shard_units(self) -> list[nn.Module]:
        """What FSDP2 shards as units: diffusers' blocks (in the model; each window block runs its own's
        ``window_forward``)."""
        return list(self.transformer.transformer_blocks)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> TextConditioning:
        return self.text_encoder(prompts)


def load_text_encoders(weights: Path, dtype: torch.dtype) -> HunyuanTextEncoders:
    """The release's text encoders, loaded once per process (a distill stage builds three backbones)."""
    return load_text_encoders_once("hunyuan", weights, dtype, HunyuanTextEncoders.from_weights)


def build_hunyuan(options: HunyuanOptions, **_: Any) -> HunyuanBackbone:
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel

    transformer = options.build_transformer(HunyuanVideo15Transformer3DModel)
    cfg = transformer.config
    codec = options.build_codec(HunyuanVAECodec, AutoencoderKLHunyuanVideo15, decode_context=options.decode_context)
    text_parts = {"text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"}
    if not options.pixel_codec and not text_parts & set(options.missing_parts()):
        text_encoder = load_text_encoders(Path(options.weights), DTYPES[options.text_dtype])
    else:  # random-weight runs and the tiny preset: stand-ins of the encoders' widths
        text_encoder = HunyuanTextEncoders.stand_ins(cfg.text_embed_dim, cfg.text_embed_2_dim)
    backbone = HunyuanBackbone(transformer, codec, text_encoder, options.preset)
    backbone.random_parts = options.random_parts()  # printed by the runner: random parts only with random_init
    return backbone

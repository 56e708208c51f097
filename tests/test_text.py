"""Text conditioning (biwm.core.text): the type's batch operations and checks, and how the Wan adapter
consumes it (masked positions zeroed, as Wan's own pipeline does)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from test_model import tiny_backbone, tiny_world

from biwm.core.protocols import grid_positions
from biwm.core.text import TextConditioning, TextEncoding


def encoding(batch: int, length: int, width: int, real: list[int] | None = None, seed: int = 0) -> TextEncoding:
    """Random embeddings whose row i has ``real[i]`` real tokens (all real by default)."""
    embeds = torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))
    real = real or [length] * batch
    return TextEncoding(embeds, torch.arange(length)[None] < torch.tensor(real)[:, None])


def two_encoders(batch: int, lengths=(4, 6), real=None, seed: int = 0) -> TextConditioning:
    """A conditioning of two encoders of different lengths and widths (as HunyuanVideo's two)."""
    return TextConditioning({"llm": encoding(batch, lengths[0], 8, real, seed),
                             "byt5": encoding(batch, lengths[1], 3, None, seed + 1)})


# --------------------------------------------------------------------------------------- the type


def test_from_tensor_marks_every_token_real():
    embeds = torch.randn(2, 5, 4)
    text = TextConditioning.from_tensor(embeds, "t5")
    assert text.names == ("t5",) and text.batch_size == 2
    assert text["t5"].embeds is embeds
    assert text["t5"].mask.dtype == torch.bool and text["t5"].mask.shape == (2, 5) and bool(text["t5"].mask.all())
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    assert text.from_tensor(embeds, "t5", mask)["t5"].mask is mask


def test_cat_pads_each_encoder_to_its_longest_with_zeros_and_mask_false():
    a = TextConditioning({"t5": encoding(2, 3, 4, real=[3, 1], seed=0)})
    b = TextConditioning({"t5": encoding(1, 5, 4, real=[2], seed=1)})
    both = TextConditioning.cat([a, b])
    embeds, mask = both["t5"].embeds, both["t5"].mask
    assert both.batch_size == 3 and embeds.shape == (3, 5, 4) and mask.shape == (3, 5)
    assert torch.equal(embeds[:2, :3], a["t5"].embeds) and torch.equal(embeds[2:], b["t5"].embeds)
    assert torch.equal(embeds[:2, 3:], torch.zeros(2, 2, 4))  # the padding added to a's rows
    assert mask.tolist() == [[True, True, True, False, False], [True, False, False, False, False],
                             [True, True, False, False, False]]


def test_cat_of_equal_lengths_is_torch_cat():
    """Conditional and unconditional rows of one encoder (CFG batching): exactly the concatenated tensors."""
    a, b = encoding(2, 4, 3, seed=0), encoding(1, 4, 3, real=[0], seed=1)
    both = TextConditioning.cat([TextConditioning({"t5": a}), TextConditioning({"t5": b}).expand(2)])
    assert torch.equal(both["t5"].embeds, torch.cat([a.embeds, b.embeds.expand(2, -1, -1)]))
    assert torch.equal(both["t5"].mask, torch.cat([a.mask, b.mask.expand(2, -1)]))


def test_select_takes_batch_rows():
    text = two_encoders(4, real=[4, 3, 2, 1])
    for rows, expected in [(1, [1]), (-1, [3]), (slice(1, 3), [1, 2]), ([3, 0], [3, 0]),
                           (torch.tensor([2, 2]), [2, 2]), (torch.tensor([True, False, False, True]), [0, 3])]:
        got = text.select(rows)
        assert got.batch_size == len(expected), rows
        for name in text.names:
            assert torch.equal(got[name].embeds, text[name].embeds[expected])
            assert torch.equal(got[name].mask, text[name].mask[expected])


def test_expand_repeats_one_row_as_a_view():
    one = two_encoders(1, real=[2])
    many = one.expand(3)
    assert many.batch_size == 3
    for name in one.names:
        assert many[name].embeds.data_ptr() == one[name].embeds.data_ptr()  # no copy
        assert torch.equal(many[name].embeds, one[name].embeds.expand(3, -1, -1))
        assert torch.equal(many[name].mask, one[name].mask.expand(3, -1))
    assert many.expand(3) is many
    with pytest.raises(ValueError, match="a batch of 3 cannot be expanded to 2 .only a batch of 1 expands"):
        many.expand(2)


def test_to_casts_the_embeddings_only():
    text = two_encoders(2)
    half = text.to(dtype=torch.float16)
    for name in text.names:
        assert half[name].embeds.dtype == torch.float16 and half[name].mask.dtype == torch.bool
        assert torch.equal(half[name].mask, text[name].mask)
    moved = text.to("meta")
    assert all(moved[n].embeds.is_meta and moved[n].mask.is_meta for n in text.names)
    assert moved["llm"].embeds.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a float type .it applies to the embeds., got torch.int64"):
        text.to(dtype=torch.long)


def test_where_picks_rows_and_expands_a_single_row():
    """Text dropout in training: per row the null prompt's (one row, expanded) or the prompt's."""
    text = TextConditioning({"t5": encoding(3, 4, 2, seed=0)})
    null = TextConditioning({"t5": encoding(1, 4, 2, real=[0], seed=1)})
    drop = torch.tensor([True, False, True])
    mixed = TextConditioning.where(drop, null, text)
    assert torch.equal(mixed["t5"].embeds, torch.where(drop.view(-1, 1, 1), null["t5"].embeds.expand(3, -1, -1),
                                                       text["t5"].embeds))
    assert mixed["t5"].mask.tolist() == [[False] * 4, [True] * 4, [False] * 4]
    longer = TextConditioning({"t5": encoding(1, 6, 2, seed=2)})
    assert TextConditioning.where(drop, longer, text)["t5"].mask.tolist() == [
        [True] * 6, [True] * 4 + [False] * 2, [True] * 6]
    with pytest.raises(ValueError, match=r"condition must be a bool tensor \[B\], got torch.float32 \[3\]"):
        TextConditioning.where(drop.float(), null, text)


def test_two_encoders_round_trip_through_cat_and_select():
    a = two_encoders(2, lengths=(4, 6), real=[4, 1], seed=0)
    b = two_encoders(3, lengths=(5, 6), real=[5, 2, 3], seed=10)
    both = TextConditioning.cat([a, b])
    assert both.names == ("llm", "byt5") and both.batch_size == 5
    assert both["llm"].embeds.shape == (5, 5, 8) and both["byt5"].embeds.shape == (5, 6, 3)
    back_b = both.select(slice(2, None))
    for name in b.names:  # b's rows were the longest of both encoders: they come back unchanged
        assert torch.equal(back_b[name].embeds, b[name].embeds) and torch.equal(back_b[name].mask, b[name].mask)
    back_a = both.select([0, 1])
    assert torch.equal(back_a["byt5"].embeds, a["byt5"].embeds)
    assert torch.equal(back_a["llm"].embeds[:, :4], a["llm"].embeds)  # a's llm rows, padded by one token
    assert torch.equal(back_a["llm"].mask, torch.cat([a["llm"].mask, torch.zeros(2, 1, dtype=torch.bool)], 1))
    again = TextConditioning.cat([back_a, back_b])
    for name in both.names:
        assert torch.equal(again[name].embeds, both[name].embeds) and torch.equal(again[name].mask, both[name].mask)


def test_errors_name_the_field():
    emb = torch.randn(2, 4, 3)
    ok = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs at least one encoder"):
        TextConditioning({})
    with pytest.raises(ValueError, match=r"mask of 't5' must be bool \(True = real token\), got torch.int64"):
        TextConditioning({"t5": TextEncoding(emb, ok.long())})
    with pytest.raises(ValueError, match=r"mask of 't5' is \[2, 3\], expected \[2, 4\] \(the \[B, L\] of its embeds\)"):
        TextConditioning({"t5": TextEncoding(emb, ok[:, :3])})
    not_3d = r"embeds of 't5' must be a float tensor \[B, L, D\], got torch.float32 \[2, 4\]"
    with pytest.raises(ValueError, match=not_3d):
        TextConditioning({"t5": TextEncoding(emb[..., 0], ok)})
    with pytest.raises(ValueError, match="encoders disagree on the batch size: 'llm' has 2, 'byt5' has 3"):
        TextConditioning({"llm": TextEncoding(emb, ok), "byt5": encoding(3, 4, 3)})
    with pytest.raises(TypeError, match="encoder 't5' must be a TextEncoding, got Tensor"):
        TextConditioning({"t5": emb})
    with pytest.raises(KeyError, match="no text encoder 'clip' in this conditioning .it has 'llm', 'byt5'"):
        two_encoders(1)["clip"]
    with pytest.raises(ValueError, match="cat: the encoders differ .'t5' and 'llm', 'byt5'"):
        TextConditioning.cat([TextConditioning.from_tensor(emb, "t5"), two_encoders(1)])
    with pytest.raises(ValueError, match=r"cat: embeds of 't5' have different widths \[3, 5\]"):
        TextConditioning.cat([TextConditioning.from_tensor(emb, "t5"),
                              TextConditioning.from_tensor(emb.new_zeros(1, 4, 5), "t5")])
    with pytest.raises(ValueError, match="cat needs at least one conditioning"):
        TextConditioning.cat([])


# ----------------------------------------------------------------------------------- the Wan adapter


def blocks_output(bb, text: TextConditioning, seed: int = 0) -> torch.Tensor:
    """The tiny backbone's blocks on fixed random tokens, under ``text``."""
    x = torch.randn(text.batch_size, 48, 2, 8, 8, generator=torch.Generator().manual_seed(seed))
    seq = bb.patch_embed(x).flatten(2).transpose(1, 2)
    t = torch.full((text.batch_size, seq.shape[1]), 700.0)
    with torch.no_grad():
        return bb.run_blocks(seq, t, text, bb.rotary(grid_positions(2, 4, 4))).hidden


def test_wan_zeroes_the_embeddings_the_mask_hides():
    bb = tiny_backbone()
    embeds = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))  # text_dim 32, every position non-zero
    mask = torch.arange(8)[None] < torch.tensor([[5], [3]])  # the tail of each prompt is padding
    masked = blocks_output(bb, TextConditioning.from_tensor(embeds, "t5", mask))
    zeroed_by_hand = blocks_output(bb, TextConditioning.from_tensor(embeds * mask[..., None], "t5"))
    unmasked = blocks_output(bb, TextConditioning.from_tensor(embeds, "t5"))
    assert torch.equal(masked, zeroed_by_hand)
    assert not torch.allclose(masked, unmasked, atol=1e-3)
    with pytest.raises(ValueError, match="text conditioning from encoders 'llm', 'byt5', expected only 't5'"):
        blocks_output(bb, two_encoders(2))


def test_byte_encoder_masks_the_prompt_bytes_and_pads_with_zeros():
    bb = tiny_backbone()
    text = bb.encode_text(["ab", "", "x" * 40])
    enc = text["t5"]
    assert text.names == ("t5",) and enc.embeds.dtype == torch.float32 and enc.embeds.shape == (3, 16, 32)
    assert enc.mask.sum(1).tolist() == [2, 0, 16]  # truncated at max_length
    assert bool((enc.embeds[~enc.mask] == 0).all()) and bool((enc.embeds[enc.mask] != 0).any(-1).all())


def test_the_mask_keeps_the_byte_encoders_numerics():
    """The byte stand-in's padding is zero already, so its mask changes nothing: a CFG sample of a
    padded prompt is bit-identical to the same sample with every token marked real (the bare tensor
    the backbone took before the mask existed)."""
    from biwm.core.sampling import Sampler
    from biwm.core.window import Window

    world = tiny_world().eval()
    bb = world.backbone
    text, null = bb.encode_text(["a room", "a box"]), bb.encode_text([""])
    assert not bool(text["t5"].mask.all()) and not bool(null["t5"].mask.any())

    def sample(text, null):
        window = Window(text=text, chunk=torch.randn(2, 48, 2, 8, 8, generator=torch.Generator().manual_seed(0)),
                        timestep=torch.zeros(2))
        return Sampler(3, 3.0, cfg_scale=2.0).sample_chunk(world, window, null, None)

    def all_real(text):
        return TextConditioning.from_tensor(text["t5"].embeds, "t5")

    assert torch.equal(sample(text, null), sample(all_real(text), all_real(null)))


class StubTokenizer:
    """Bytes -> ids 2.., then end-of-sequence 1, padded with 0 to max_length (what the UMT5 encoder reads)."""

    def __call__(self, prompts, max_length, **_):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = [2 + b % 60 for b in prompt.encode()][: max_length - 1] + [1]
            ids[i, : len(row)] = torch.tensor(row)
        return SimpleNamespace(input_ids=ids, attention_mask=(ids != 0).long())


def test_umt5_encoder_returns_its_attention_mask_and_wan_zeroes_the_padding():
    """With UMT5 the padding's embeddings are not zero; the adapter zeroes them as Wan's pipeline does,
    so the blocks see what diffusers' own forward sees given the pipeline's zero-padded embeddings."""
    from transformers import UMT5Config, UMT5EncoderModel

    from biwm.backbones.wan import UMT5TextEncoder

    bb = tiny_backbone()
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8))
    bb.text_encoder = UMT5TextEncoder(StubTokenizer(), encoder, max_length=8)
    text = bb.encode_text(["ab", "abcd"])
    enc = text["t5"]
    assert enc.mask.tolist() == [[True] * 3 + [False] * 5, [True] * 5 + [False] * 3]
    assert bool((enc.embeds[~enc.mask] != 0).any())  # the encoder's output past the prompt
    x = torch.randn(2, 48, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300.0, 800.0])
    seq = bb.patch_embed(x).flatten(2).transpose(1, 2)
    with torch.no_grad():
        ours = bb.unembed(bb.run_blocks(seq, t[:, None].expand(2, seq.shape[1]), text,
                                        bb.rotary(grid_positions(2, 4, 4))), (2, 4, 4))
        stock = bb.transformer(x, t, enc.embeds * enc.mask[..., None]).sample
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)

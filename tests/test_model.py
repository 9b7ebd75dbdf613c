"""The lean Whisper against transformers, and the KV cache operations speculative decoding relies on."""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_hf_dir
from transformers import WhisperForConditionalGeneration

from specasr_vllm.models.loading import load_whisper

TOL = 1e-4  # fp32, max absolute logit difference


@pytest.fixture(scope="module", params=[80, 128], ids=["80mel", "128mel"])
def random_pair(request, tmp_path_factory, base_dir):
    d = make_random_hf_dir(tmp_path_factory.mktemp(f"rand{request.param}"), base_dir, n_mels=request.param)
    return load_whisper(d), WhisperForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()


def _hf_logits(hf, mel, tokens):
    with torch.no_grad():
        return hf(input_features=mel, decoder_input_ids=tokens).logits


def test_random_model_matches_transformers(random_pair):
    lean, hf = random_pair
    mel = torch.randn(2, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (2, 9))
    with torch.no_grad():
        hf_enc = hf.model.encoder(mel).last_hidden_state
    assert (lean.encode(mel) - hf_enc).abs().max() < TOL
    cache = lean.new_cache(lean.encode(mel))
    ours = torch.cat([lean.decode(tokens[:, :4], cache), lean.decode(tokens[:, 4:], cache)], dim=1)
    assert (ours - _hf_logits(hf, mel, tokens)).abs().max() < TOL


def test_real_base_matches_transformers(base_dir):
    lean = load_whisper(base_dir)
    hf = WhisperForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.manual_seed(1)
    mel = torch.randn(1, 80, 3000) * 0.3
    tokens = torch.tensor([[50258, 50259, 50359, 50363, 440, 1029, 291, 13]])
    cache = lean.new_cache(lean.encode(mel))
    diff = (lean.decode(tokens, cache) - _hf_logits(hf, mel, tokens)).abs().max()
    assert diff < 1e-3, diff  # logits are O(30): relative 3e-5


@pytest.fixture(scope="module")
def lean(random_pair):
    return random_pair[0]


def _fresh(lean, mel, tokens):
    cache = lean.new_cache(lean.encode(mel))
    return lean.decode(tokens, cache), cache


def test_crop_then_redecode_equals_fresh(lean):
    mel = torch.randn(1, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (1, 10))
    full, _ = _fresh(lean, mel, tokens)
    cache = lean.new_cache(lean.encode(mel))
    lean.decode(torch.randint(0, 50000, (1, 10)), cache)  # a wrong draft ...
    cache.set_length(0, 0)  # ... rolled back entirely
    assert torch.allclose(lean.decode(tokens, cache), full, atol=1e-5)
    cache.set_length(0, 6)  # keep 6, redo the last 4
    assert torch.allclose(lean.decode(tokens[:, 6:], cache), full[:, 6:], atol=1e-5)
    assert cache.lengths([0]) == [10]


def test_rows_with_different_lengths_decode_like_separate_requests(lean):
    mel = torch.randn(2, lean.dims.n_mels, 3000)
    a, b = torch.randint(0, 50000, (1, 7)), torch.randint(0, 50000, (1, 4))
    la, _ = _fresh(lean, mel[:1], a)
    lb, _ = _fresh(lean, mel[1:], b)
    cache = lean.new_cache(lean.encode(mel))
    lean.decode(torch.cat([a[:, :5], torch.cat([b[:, :2], b[:, :3]], 1)]), cache)  # row 1 gets junk after 2
    cache.set_length(1, 2)
    out = lean.decode(torch.cat([a[:, 5:], b[:, 2:]]), cache)
    assert torch.allclose(out[0], la[0, 5:], atol=1e-5)
    assert torch.allclose(out[1], lb[0, 2:], atol=1e-5)


def test_tree_mask_gives_each_branch_its_chain_logits(lean):
    """A tree [root; x under root; y under root; z under x] equals chains root-x-z and root-y."""
    mel = torch.randn(1, lean.dims.n_mels, 3000)
    prefix = torch.randint(0, 50000, (1, 3))
    root, x, y, z = 11, 22, 33, 44
    chain_xz, _ = _fresh(lean, mel, torch.cat([prefix, torch.tensor([[root, x, z]])], 1))
    chain_y, _ = _fresh(lean, mel, torch.cat([prefix, torch.tensor([[root, y]])], 1))
    cache = lean.new_cache(lean.encode(mel))
    lean.decode(prefix, cache)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)[None]
    depths = torch.tensor([[0, 1, 1, 2]])
    tree = lean.decode(torch.tensor([[root, x, y, z]]), cache, tree_mask=mask, depths=depths)
    assert torch.allclose(tree[0, [0, 1, 3]], chain_xz[0, 3:], atol=1e-5)
    assert torch.allclose(tree[0, 2], chain_y[0, 4], atol=1e-5)
    # keep the accepted path root-y: the cache then continues exactly like the chain
    cache.keep(0, 3, [0, 2])
    nxt = lean.decode(torch.tensor([[55]]), cache)
    ref, _ = _fresh(lean, mel, torch.cat([prefix, torch.tensor([[root, y, 55]])], 1))
    assert torch.allclose(nxt[0, 0], ref[0, -1], atol=1e-5)


def test_compact_moves_live_rows_to_the_front(lean):
    mel = torch.randn(3, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (3, 5))
    _, cache = _fresh(lean, mel, tokens)
    cache.release([1])
    assert cache.compact([0, 2]) == [0, 1]  # row 2 moved into the hole, row 0 stayed
    nxt = lean.decode(torch.tensor([[7], [8]]), cache, [0, 1])
    ref, _ = _fresh(lean, mel[[0, 2]], torch.cat([tokens[[0, 2]], torch.tensor([[7], [8]])], 1))
    assert torch.allclose(nxt[:, 0], ref[:, -1], atol=1e-5)


def test_scattered_rows_decode_like_contiguous_ones(lean):
    mel = torch.randn(3, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (3, 5))
    _, cache = _fresh(lean, mel, tokens)
    nxt = lean.decode(torch.tensor([[7], [8]]), cache, [2, 0])  # gathered for reading, written back by index
    ref, _ = _fresh(lean, mel[[2, 0]], torch.cat([tokens[[2, 0]], torch.tensor([[7], [8]])], 1))
    assert torch.allclose(nxt[:, 0], ref[:, -1], atol=1e-5)
    assert cache.lengths([0, 1, 2]) == [6, 5, 6]


def test_rows_join_mid_decode_through_the_free_list(lean):
    """Requests joining a running batch (vLLM's continuous batching) decode as if they had been alone."""
    mel = torch.randn(2, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (2, 5))
    cache = lean.empty_cache(1)
    first = cache.claim(*lean.cross_kv(lean.encode(mel[:1])))
    lean.decode(tokens[:1], cache, first)
    # a row encoded over fewer frames (unpadded audio) joins: the pool grows, the short row is masked
    second = cache.claim(*lean.cross_kv(lean.encode(mel[1:, :, :1000])))
    assert (first, second, cache.rows, cache.frames([0, 1])) == ([0], [1], 2, [1500, 500])
    lean.decode(tokens[1:, :3], cache, second)
    assert cache.lengths([0, 1]) == [5, 3]
    nxt = lean.decode(torch.tensor([[7], [8]]), cache, [0, 1])
    ref0, _ = _fresh(lean, mel[:1], torch.cat([tokens[:1], torch.tensor([[7]])], 1))
    ref1, _ = _fresh(lean, mel[1:, :, :1000], torch.cat([tokens[1:, :3], torch.tensor([[8]])], 1))
    assert torch.allclose(nxt[0, 0], ref0[0, -1], atol=1e-5) and torch.allclose(nxt[1, 0], ref1[0, -1], atol=1e-5)
    cache.release(first)  # the lowest free row is reused first
    assert cache.claim(*lean.cross_kv(lean.encode(mel[:1]))) == [0]
    with pytest.raises(ValueError, match="not in use"):
        cache.release([1, 1])


def test_fixed_shape_decode_equals_the_trimmed_one(lean):
    """Attention over every slot and frame under a mask (shapes independent of lengths) changes nothing."""
    mel = torch.randn(2, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (2, 6))
    _, trimmed = _fresh(lean, mel, tokens[:, :4])
    _, fixed = _fresh(lean, mel, tokens[:, :4])
    for cache in (trimmed, fixed):
        cache.set_length(1, 2)
    a = lean.decode(tokens[:, 4:], trimmed)
    b = lean.decode(tokens[:, 4:], fixed, fixed=True)
    assert torch.allclose(a, b, atol=1e-5)
    assert fixed.lengths([0, 1]) == trimmed.lengths([0, 1]) == [6, 4]


def test_short_audio_encoder_uses_leading_positions(lean):
    mel = torch.randn(1, lean.dims.n_mels, 3000)
    assert lean.encode(mel[:, :, :1000]).shape == (1, 500, lean.dims.d_model)


def test_decode_past_capacity_is_refused(lean):
    cache = lean.new_cache(lean.encode(torch.randn(1, lean.dims.n_mels, 3000)))
    cache.set_length(0, 447)
    with pytest.raises(ValueError, match="exceed"):
        lean.decode(torch.tensor([[1, 2]]), cache)


@pytest.mark.parametrize("starts,n,span", [([5], 1, 64), ([40, 3], 4, 64), ([0], 7, 8), ([10, 20, 0], 3, 448)])
def test_chain_step_inputs_equal_an_explicit_causal_tree(starts, n, span):
    """``step_inputs`` builds a chain's (no tree mask, no depths) masks by a shortcut; they are the general
    rule's with the causal tree spelled out."""
    from specasr_vllm.models.whisper import step_inputs

    cpu = torch.device("cpu")
    chain = step_inputs(starts, n, None, None, span, [30] * len(starts), 40, cpu)
    causal = torch.ones(n, n, dtype=torch.bool).tril().expand(len(starts), n, n)
    tree = step_inputs(starts, n, causal, torch.arange(n).expand(len(starts), n), span, [30] * len(starts), 40, cpu)
    for name in ("positions", "slots", "mask", "audio_mask"):
        assert torch.equal(getattr(chain, name), getattr(tree, name)), name


def test_a_batch_that_loses_requests_keeps_its_rows_one_block_in_order(lean):
    """``BatchRows.keep``: after requests end, the others sit in rows ``0 .. n - 1`` in the order of their positions,
    so a compiled step reads them as one block (compaction alone leaves them out of order: rows 0, 2, 3, 1 here),
    and each position still holds its own request's audio and tokens."""
    from specasr_vllm.engine.rows import BatchRows

    mel = torch.randn(5, lean.dims.n_mels, 3000)
    tokens = torch.randint(0, 50000, (5, 4))
    features = lean.encode(mel)
    with BatchRows(lean, features) as batch:
        lean.decode(tokens, batch.cache, batch.rows)
        batch.keep([0, 2, 3, 4])  # request 1 ended; request 4 moves into its row
        assert batch.rows == [0, 1, 2, 3] and batch.active == [0, 4, 2, 3]
        new = torch.tensor([[7], [8], [9], [10]])
        nxt = lean.decode(new, batch.cache, batch.rows)
        ref, _ = _fresh(lean, mel[batch.active], torch.cat([tokens[batch.active], new], 1))
        assert torch.allclose(nxt[:, 0], ref[:, -1], atol=1e-5)
        batch.keep([])
        assert batch.rows == [] and batch.active == []

"""SpecASR's pieces on hand-made token arrays (vLLM spec-decode test style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specasr_vllm.models.packing import TreeRow, pack_rows
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.speculation.acceptance import Acceptance, accept_greedy, accepted_path
from specasr_vllm.speculation.adaptive import ConfidencePolicy, FixedLength
from specasr_vllm.speculation.bridge import IdentityBridge, TextBridge, TextSoFar, make_bridge
from specasr_vllm.speculation.recycling import common_prefix, recycle_candidates
from specasr_vllm.speculation.requests import draft_features
from specasr_vllm.speculation.tree import ROOT, DraftTree

EOT = 99


def test_chain_is_a_tree_with_one_child_per_node():
    tree = DraftTree.chain([5, 6, 7], [0.9, 0.8, 0.7])
    assert tree.parents == [ROOT, 0, 1]
    assert [tree.depth(i) for i in range(3)] == [1, 2, 3]
    row = tree.verification_row(4)
    assert row.tokens == [4, 5, 6, 7] and row.depths == [0, 1, 2, 3] and row.parents == [-1, 0, 1, 2]
    packed = pack_rows([row], EOT, torch.device("cpu"))  # a chain filling its width: the decoder's causal default
    assert packed.tokens.tolist() == [[4, 5, 6, 7]] and packed.mask is None and packed.depths is None
    padded = pack_rows([row], EOT, torch.device("cpu"), width=5)  # padded: a mask, and the padding sees itself
    assert torch.equal(padded.mask[0], torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                     [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool))
    assert padded.depths.tolist() == [[0, 1, 2, 3, 0]]


def test_tree_mask_and_trie_merge():
    tree = DraftTree.chain([5, 6, 7])
    path = tree.add_path(ROOT, [5, 8, 9])  # shares node 5, branches at depth 2
    assert path == [0, 3, 4] and len(tree) == 5
    row = tree.verification_row(1)
    assert row.tokens == [1, 5, 6, 7, 8, 9] and row.depths == [0, 1, 2, 3, 2, 3]
    # packed beside a shorter row: padding sees only itself, the short row is unchanged
    packed = pack_rows([row, TreeRow.chain([3, 4])], EOT, torch.device("cpu"))
    mask = packed.mask[0]
    assert packed.tokens[1].tolist() == [3, 4, EOT, EOT, EOT, EOT] and packed.depths[1].tolist() == [0, 1, 0, 0, 0, 0]
    assert torch.equal(packed.mask[1], torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]] + [
        [int(i == j) for j in range(6)] for i in range(2, 6)], dtype=torch.bool))
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # 8 sees root, 5, itself; not 6 or 7
        [1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_accepted_path_recovers_nodes_from_emitted_tokens():
    """A host that samples on its own reports tokens; the drafter recovers the nodes, for any tree."""
    tree = DraftTree.chain([5, 6, 7])
    tree.add_path(ROOT, [5, 8, 9])
    assert accepted_path(tree, [5, 8, 4]) == Acceptance([0, 3], 4)
    assert accepted_path(tree, [2]) == Acceptance([], 2)
    with pytest.raises(ValueError, match="not a child"):
        accepted_path(tree, [5, 9, 1])


@pytest.mark.parametrize(
    "choices,nodes,bonus",
    [
        ([5, 6, 7, 3], [0, 1, 2], 3),  # all accepted, bonus from the last node
        ([5, 6, 2, 3], [0, 1], 2),  # rejected at depth 3
        ([4, 0, 0, 0], [], 4),  # first token wrong: the target's token alone
        ([5, 6, EOT, 0], [0, 1], EOT),  # end of text ends the walk
    ],
)
def test_accept_chain(choices, nodes, bonus):
    acc = accept_greedy(DraftTree.chain([5, 6, 7]), choices, EOT)
    assert (acc.nodes, acc.bonus) == (nodes, bonus)


def test_accept_follows_the_branch_the_target_picks():
    tree = DraftTree.chain([5, 6, 7])
    tree.add_path(ROOT, [5, 8, 9])  # nodes 3 (8), 4 (9)
    # inputs: root, 5, 6, 7, 8, 9; the target says 5 after root, 8 after 5, 9 after 8, 11 after 9
    acc = accept_greedy(tree, [5, 8, 0, 0, 9, 11], EOT)
    assert acc.nodes == [0, 3, 4] and acc.bonus == 11
    assert acc.tokens(tree) == [5, 8, 9, 11]


def test_accept_empty_tree_is_an_ar_step():
    acc = accept_greedy(DraftTree(), [42], EOT)
    assert acc.nodes == [] and acc.bonus == 42


@pytest.mark.parametrize(
    "matched,expected",
    [
        (0, [[11, 12, 13], [10, 11, 12, 13], [12, 13]]),  # slip in token 0 (" a")
        (3, [[12, 13], [11, 12, 13], [13]]),  # bytes 0-2 agree: slip inside token 1
        (4, [[12, 13], [11, 12, 13], [13]]),  # still inside token 1
        (5, [[13], [12, 13]]),  # token 2 replaced
        (9, []),  # everything matched: nothing to recycle
    ],
)
def test_recycle_candidates(matched, expected):
    tokens, pieces = [10, 11, 12, 13], [b" a", b" bc", b" d", b" e"]  # byte ends 2, 5, 7, 9
    assert recycle_candidates(tokens, pieces, matched, max_len=8) == expected


def test_recycle_candidates_respect_max_len():
    assert recycle_candidates([1, 2, 3, 4, 5], [b"x"] * 5, 0, max_len=2) == [[2, 3], [1, 2], [3, 4]]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix(b"abc", b"abc") == 3


def test_fixed_length_policy():
    p = FixedLength(3)
    assert [p.keep_going(d, 0.01, 1.0, 0.0) for d in range(5)] == [True, True, True, False, False]


def test_threshold_policy():
    p = ConfidencePolicy(threshold=0.5, min_path=0.1, cap=4, auto=False)
    assert p.keep_going(0, 0.9, 1.0, 0) and not p.keep_going(0, 0.4, 1.0, 0)
    assert not p.keep_going(1, 0.9, 0.1, 0)  # the path's probability would fall below 0.1
    assert not p.keep_going(4, 0.99, 1.0, 0)  # cap


def test_auto_policy_learns_from_acceptance_and_costs():
    p = ConfidencePolicy(auto=True, cap=32)
    for _ in range(200):  # confident drafts always accepted, unconfident ones never
        p.observe([0.95, 0.95, 0.3], 2)
    assert p.acceptance(0.95) > 0.9 and p.acceptance(0.3) < 0.1
    p.costs.draft_step, p.costs.verify = 0.005, 0.06
    assert p.keep_going(5, 0.95, 0.9, 4.0)
    assert not p.keep_going(5, 0.3, 0.9, 4.0)
    for _ in range(100):  # drafting becomes expensive: stop earlier
        p.costs.observe(draft_step=0.2)
    assert not p.keep_going(5, 0.95, 0.9, 4.0)


@pytest.fixture(scope="module")
def tokenizers(base_dir, tiny_en_dir):
    return WhisperTokenizer.from_dir(base_dir, 51865), WhisperTokenizer.from_dir(tiny_en_dir, 51864)


def test_make_bridge(tokenizers):
    multi, english = tokenizers
    assert isinstance(make_bridge(multi, multi), IdentityBridge)
    assert isinstance(make_bridge(multi, english), TextBridge)


def test_text_bridge_context(tokenizers):
    multi, english = tokenizers
    bridge = TextBridge(multi, english)
    ids = multi.encode(" He hoped there would be stew")
    assert english.decode(bridge.to_draft(ids)) == " He hoped there would be stew"
    assert bridge.to_draft(ids + [multi.eot]) == bridge.to_draft(ids)
    # a target token may end inside a character: the draft waits until the character is complete
    ids = multi.encode(" 鬱 and 𝄞 music")
    prefixes = [b"".join(multi.token_bytes[t] for t in ids[:n]) for n in range(len(ids) + 1)]
    assert any(not _valid(p) for p in prefixes)  # this text does split a character
    for n, data in enumerate(prefixes):
        out = bridge.to_draft(ids[:n])
        assert (out is None) == (not _valid(data))
        if out is not None:
            assert b"".join(english.token_bytes[t] for t in out) == data


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_text_bridge_reads_a_growing_output_once(tokenizers):
    """With a ``TextSoFar`` per request, each prefix of a growing output maps to exactly what a fresh reading of
    the whole prefix gives (words split across tokens, characters split across tokens, digits, contractions,
    runs of spaces, timestamps and end-of-text among the ids), and an output that does not simply grow is read
    again from the start."""
    multi, english = tokenizers
    bridge = TextBridge(multi, english)
    text = " It's 1,024 gold-pieces,  鬱 and 𝄞 music!  Don't   stop... now, Mr. O'Neil"
    ids = multi.encode(text)
    ids = ids[:5] + [multi.timestamp_begin + 7] + ids[5:] + [multi.eot]
    so_far = TextSoFar()
    for n in range(len(ids) + 1):
        assert bridge.to_draft(ids[:n], so_far) == bridge.to_draft(ids[:n]), n
    assert so_far.stable > 0 and english.decode(so_far.stable_tokens) == text[: len(english.decode(so_far.stable_tokens))]
    other = multi.encode(" A different start")
    assert bridge.to_draft(other, so_far) == bridge.to_draft(other)  # not a continuation: read again
    assert bridge.to_draft(other[:2], so_far) == bridge.to_draft(other[:2])  # shorter: read again


def test_text_bridge_proposals_cut_unfinished_words(tokenizers):
    multi, english = tokenizers
    bridge = TextBridge(multi, english)
    draft = english.encode(" for dinner turnips")
    probs = [0.9] * len(draft)
    nxt_word = english.encode(" and")[0]
    nxt_piece = english.encode("ips")[0]
    done = bridge.to_target(draft, probs, nxt_word)  # the next token starts a word: all words complete
    assert multi.decode(done.tokens) == " for dinner turnips" and done.draft_used == len(draft)
    cut = bridge.to_target(draft, probs, nxt_piece)  # "turnips..." may continue: drop it
    assert multi.decode(cut.tokens) == " for dinner"
    assert cut.draft_used == len(english.encode(" for dinner"))
    ended = bridge.to_target(draft + [english.eot], probs + [0.8], None)
    assert ended.tokens[-1] == multi.eot and multi.decode(ended.tokens) == " for dinner turnips"


def test_text_bridge_probabilities_take_the_weakest_overlap(tokenizers):
    multi, english = tokenizers
    bridge = TextBridge(multi, english)
    draft = english.encode(" stew for")
    mapped = bridge.to_target(draft, [0.9, 0.3], english.encode(" dinner")[0])
    assert mapped.tokens == multi.encode(" stew for") and mapped.probs == [0.9, 0.3]


def test_identity_bridge_is_free():
    bridge = IdentityBridge(EOT)
    assert bridge.to_draft([1, 2]) == [1, 2]
    assert bridge.to_target([3, 4], [0.5, 0.6], None).tokens == [3, 4]


def test_the_pass_line_fits_whole_passes_by_width():
    """Passes at 19 ms plus 2.2 ms a node: the line is unknown until ``MIN_PASSES`` passes of more than one width,
    then found; a pause counts as at most ``OUTLIER`` times the line's price."""
    from specasr_vllm.speculation.adaptive import Costs, PassLine

    line = PassLine()
    for _ in range(PassLine.MIN_PASSES + 2):
        line.observe(4, 0.019 + 0.0022 * 4)
    assert line.line() is None  # one width: no slope to fit
    for nodes in [1, 7, 3, 12, 0, 5] * 3:
        line.observe(nodes, 0.019 + 0.0022 * nodes)
    fixed, per_node = line.line()
    assert fixed == pytest.approx(0.019) and per_node == pytest.approx(0.0022)
    before = line.seconds
    line.observe(2, 10.0)
    assert line.seconds == pytest.approx(PassLine.FORGET * before + Costs.OUTLIER * (0.019 + 0.0022 * 2))
    assert PassLine().line() is None


def test_the_auto_policy_prices_a_token_by_the_pass_line():
    """A draft step of 1.7 ms against a 19 ms verification says one more token at 40% is worth it; passes that cost
    19 ms plus 9 ms a node (each node widens the verification too) say it is not."""
    p = ConfidencePolicy(auto=True, cap=32)
    for i in range(200):  # tokens the draft gives 0.95 accepted, those it gives 0.45 accepted 40% of the time
        p.observe([0.95, 0.45], 2 if i % 5 < 2 else 1)
    assert p.acceptance(0.45) == pytest.approx(0.4, abs=0.02) and p.acceptance(0.95) > 0.95
    p.costs.draft_step, p.costs.verify = 0.0017, 0.019
    assert p.keep_going(4, 0.45, 0.9, 3.5)
    for nodes in [1, 2, 4, 8] * 3:
        p.costs.passes.observe(nodes, 0.019 + 0.009 * nodes)
    assert not p.keep_going(4, 0.45, 0.9, 3.5)
    assert p.keep_going(4, 0.95, 0.9, 3.5)


def test_ar_price_per_row_by_batch_width():
    """12 ms for one row and 36 ms for eight (4.5 ms a row): between them a whole step is interpolated, beyond the
    widest measured its price per row holds; nothing before one row is measured."""
    from specasr_vllm.speculation.adaptive import Costs

    costs = Costs()
    costs.observe(ar_step=0.0045, rows=8)
    assert costs.ar_price(8) is None and costs.ar_samples == 0
    costs.observe(ar_step=0.012)
    assert costs.ar_price(1) == pytest.approx(0.012) and costs.ar_price(8) == pytest.approx(0.0045)
    assert costs.ar_price(4) == pytest.approx((0.012 + (0.036 - 0.012) * 3 / 7) / 4)
    assert costs.ar_price(16) == pytest.approx(0.0045)
    costs.observe(ar_step=0.0055, rows=8)  # as at one row: the least of the first FIRST, then a moving average
    costs.observe(ar_step=0.0040, rows=8)
    assert costs.ar_price(8) == pytest.approx(0.0040) and costs.ar_wide_samples == {8: 3}
    costs.observe(ar_step=0.0050, rows=8)
    assert costs.ar_price(8) == pytest.approx(0.9 * 0.0040 + 0.1 * 0.0050)


def test_one_slow_call_moves_the_measured_costs_only_so_far():
    """A first call that traces a graph (0.5 s) among 1.4 ms draft steps: the estimate stays within
    OUTLIER times itself, and comes back within a few steps."""
    from specasr_vllm.speculation.adaptive import Costs

    costs = Costs(draft_step=0.0014, verify=0.013)
    costs.observe(draft_step=0.5, verify=0.013)
    assert costs.draft_step <= 0.0014 * (0.9 + 0.1 * Costs.OUTLIER) + 1e-12
    for _ in range(20):
        costs.observe(draft_step=0.0014)
    assert abs(costs.draft_step - 0.0014) < 0.0002
    assert costs.verify == pytest.approx(0.013)


def test_the_ar_step_is_unknown_until_measured_then_averaged():
    from specasr_vllm.speculation.adaptive import Costs

    costs = Costs()
    assert costs.ar_step is None
    for seconds in (0.037, 0.007, 0.009):  # the first FIRST: the least of them (a slow first step sets no price)
        costs.observe(ar_step=seconds)
    assert costs.ar_step == pytest.approx(0.007) and costs.ar_samples == Costs.FIRST == 3
    costs.observe(ar_step=1.0)  # then a moving average; a pause moves it at most OUTLIER times the estimate
    assert costs.ar_step == pytest.approx(0.9 * 0.007 + 0.1 * Costs.OUTLIER * 0.007)


def test_an_engine_config_takes_its_methods_preset():
    from specasr_vllm.config import EngineConfig, SpecConfig

    assert EngineConfig(method="sd").spec == SpecConfig.for_method("sd") and not EngineConfig(method="sd").spec.adaptive
    assert EngineConfig(method="specasr").spec == SpecConfig()
    assert EngineConfig(method="sd", spec=SpecConfig(k=3)).spec.k == 3  # a given one is kept


def test_the_drafts_encoder_reads_the_audios_frames_rounded_up_to_the_devices_multiple():
    mel = torch.zeros(80, 3000)
    audio = np.zeros(12 * 16000 + 5 * 160, dtype=np.float32)  # 12.05 s: 1205 frames, plus the 100-frame margin
    assert draft_features(80, mel, audio, unpadded=True).shape == (80, 1306)  # even, for the stride-2 convolution
    assert draft_features(80, mel, audio, unpadded=True, multiple=1000).shape == (80, 2000)  # a GPU's buckets
    assert draft_features(80, mel, np.zeros(29 * 16000, dtype=np.float32), True, 1000).shape == (80, 3000)
    assert draft_features(80, mel, audio, unpadded=False, multiple=1000).shape == (80, 3000)


@pytest.mark.real
def test_warm_encodes_every_input_length_the_drafts_encoder_meets(tiny_en):
    """``DraftModel.warm`` runs the encoder at every multiple of ``frame_multiple`` up to a window (a new length
    pays for its own kernel setup), and every request's input is one of those lengths."""
    from specasr_vllm.config import N_FRAMES, SpecConfig
    from specasr_vllm.speculation.draft_model import DraftModel

    draft = DraftModel(tiny_en, SpecConfig())
    lengths = []
    draft.encode = lambda mel: lengths.append(mel.shape[-1])
    draft.warm(draft.empty_cache(1))
    assert lengths == list(range(draft.frame_multiple, N_FRAMES + 1, draft.frame_multiple)) and len(lengths) == 30
    audio = np.zeros(7 * 16000 + 123, dtype=np.float32)
    frames = draft_features(80, torch.zeros(80, N_FRAMES), audio, True, draft.frame_multiple).shape[1]
    assert frames in lengths and frames >= 7 * 100


def test_speculative_decoding_on_a_cpu_is_refused_below_float32():
    """bfloat16 logits round differently in a verification pass and a one-token step (SpecASR matched AR on 13 of
    16 dev files): refused before any model loads; AR in bfloat16 and the speculative engine on a GPU are not."""
    from specasr_vllm.config import EngineConfig
    from specasr_vllm.engine import Transcriber
    from specasr_vllm.errors import InvalidRequestError

    for method in ("sd", "specasr"):
        with pytest.raises(InvalidRequestError, match="decodes in float32 only.*--encoder-dtype bfloat16"):
            Transcriber(EngineConfig(method=method, dtype="bfloat16", model="no-such-model"))
    for config in (EngineConfig(method="ar", dtype="bfloat16", model="no-such-model"),
                   EngineConfig(method="specasr", dtype="float16", device="cuda", model="no-such-model")):
        with pytest.raises(Exception) as passed:  # past the check: it fails only at loading the missing model
            Transcriber(config)
        assert "float32 only" not in str(passed.value) and "no-such-model" in str(passed.value)


@pytest.mark.real
def test_the_drafts_cross_kv_are_kept_in_bfloat16_and_its_block_steps_traced_at_warm(tiny_en):
    """On a CPU with native bfloat16 the draft keeps its cross K/V in bfloat16 (a step of several rows is bound by
    reading them) and its self K/V in float32; what it proposes stays close to float32's (here: the same best
    token at every position of a real utterance's transcript). ``warm`` traces a block graph for every number of
    rows up to a batch's, so no batch pays for a trace inside its decode."""
    from pathlib import Path

    from specasr_vllm.audio import decode_audio, log_mel_spectrogram
    from specasr_vllm.config import SpecConfig
    from specasr_vllm.speculation.draft_model import DraftModel

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    half, full = DraftModel(tiny_en, SpecConfig()), DraftModel(tiny_en, SpecConfig(draft_bf16_audio=False))
    assert half.empty_cache(1).cross_k[0].dtype == (torch.bfloat16 if native else torch.float32)
    assert half.empty_cache(1).self_k[0].dtype == full.empty_cache(1).cross_k[0].dtype == torch.float32
    sample = Path(__file__).parents[1] / "specasr_vllm" / "samples" / "librispeech-1089-134686-0000.flac"
    features = full.encode(log_mel_spectrogram(decode_audio(sample), 80)[None])
    tok = tiny_en.tokenizer
    tokens = torch.tensor([tok.prefix("en") + tok.encode(" He hoped there would be stew for dinner, turnips")])
    best = []
    for draft in (half, full):
        cache = draft.empty_cache(1)
        rows = cache.claim(*draft.cross_kv(features))
        best.append(draft.decode(tokens, cache, rows).argmax(-1))
    assert torch.equal(best[0], best[1])

    traced = DraftModel(tiny_en, SpecConfig(), compile=True)
    traced.encode = lambda mel: torch.zeros(1, mel.shape[-1] // 2, tiny_en.model.dims.d_model)
    traced.warm(traced.empty_cache(1), rows=3)
    assert sorted(traced._block_steps) == [2, 3] and traced._step is not None

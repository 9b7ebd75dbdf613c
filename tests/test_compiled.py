"""Compiled fixed-shape steps (models/compiled.py) against the eager modules, and the decoding they make.

What is guaranteed is the argmax: compiled and eager kernels round differently (logits agree to ~1e-4),
and a one-token step and a many-token verification pass are different compiled graphs. So the model
tests compare logits within a tolerance and argmax exactly, and the dev-file test checks that AR with
compiled one-token steps and SpecASR with compiled verification passes emit the same tokens as eager AR.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_hf_dir
from test_cli import S, parse

from specasr_vllm import cli
from specasr_vllm.config import EngineConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.loading import load_whisper
from specasr_vllm.server.ray_app import parse_args

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory, base_dir):
    """A small random Whisper (head size 32), eager and compiled, and a random audio encoding."""
    eager = load_whisper(make_random_hf_dir(tmp_path_factory.mktemp("rand"), base_dir, d_model=64, heads=2))
    torch.manual_seed(3)
    return eager, CompiledWhisper(eager), eager.encode(torch.randn(4, eager.dims.n_mels, 3000))


def _caches(eager, features, rows: int, claimed: int):
    """The same cache twice: ``rows`` rows, the first ``claimed`` holding ``features``."""
    out = []
    for _ in range(2):
        cache = eager.empty_cache(rows)
        cache.claim(*eager.cross_kv(features[:claimed]))
        out.append(cache)
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() < TOL
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_rows_of_different_lengths_decode_like_eager(pair):
    """3 rows, 5 then 1 then 4 tokens, one row rolled back: same logits, lengths and cache contents."""
    eager, compiled, features = pair
    ref, cache = _caches(eager, features, rows=4, claimed=3)
    tokens = torch.randint(0, 50000, (3, 10))
    before = compiled.eager_calls
    _close(compiled.decode(tokens[:, :5], cache, [0, 1, 2]), eager.decode(tokens[:, :5], ref, [0, 1, 2]))
    cache.set_length(1, 3)  # a row that accepted less
    ref.set_length(1, 3)
    _close(compiled.decode(tokens[:, 5:6], cache, [0, 1, 2]), eager.decode(tokens[:, 5:6], ref, [0, 1, 2]))
    _close(compiled.decode(tokens[:, 6:], cache, [0, 1, 2]), eager.decode(tokens[:, 6:], ref, [0, 1, 2]))
    assert cache.lengths([0, 1, 2]) == ref.lengths([0, 1, 2]) == [10, 8, 10]
    assert compiled.eager_calls == before
    # what the compiled steps wrote is what the eager module reads next
    _close(eager.decode(tokens[:, :1], cache, [0, 1, 2]), eager.decode(tokens[:, :1], ref, [0, 1, 2]))


def test_one_row_one_token_and_widths(pair):
    """AR's step (its own static graph) and verification widths of one row, 2 to 32 tokens."""
    eager, compiled, features = pair
    ref, cache = _caches(eager, features, rows=1, claimed=1)
    for n in (4, 1, 1, 2, 7, 16, 32):
        tokens = torch.randint(0, 50000, (1, n))
        _close(compiled.decode(tokens, cache), eager.decode(tokens, ref))
    assert cache.lengths([0]) == ref.lengths([0]) == [63]


def test_a_tree_in_a_block_of_rows_behind_a_live_row(pair):
    """A tree pass over row 1 alone (row 0 live) equals eager and leaves row 0 untouched."""
    eager, compiled, features = pair
    ref, cache = _caches(eager, features, rows=3, claimed=2)
    prefix = torch.randint(0, 50000, (2, 3))
    for c in (ref, cache):
        eager.decode(prefix, c)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)[None]
    depths = torch.tensor([[0, 1, 1, 2]])
    tree = torch.tensor([[11, 22, 33, 44]])
    _close(compiled.decode(tree, cache, [1], mask, depths), eager.decode(tree, ref, [1], mask, depths))
    for c in (ref, cache):
        c.keep(1, 3, [0, 2])
    _close(eager.decode(torch.tensor([[55], [66]]), cache), eager.decode(torch.tensor([[55], [66]]), ref))


def test_scattered_rows_and_custom_heads_run_eager(pair):
    eager, compiled, features = pair
    ref, cache = _caches(eager, features, rows=3, claimed=3)
    before = compiled.eager_calls
    tokens = torch.randint(0, 50000, (2, 2))
    _close(compiled.decode(tokens, cache, [2, 0]), eager.decode(tokens, ref, [2, 0]))
    head = torch.nn.Linear(eager.dims.d_model, 7, bias=False)
    _close(compiled.decode(tokens, cache, [0, 1], head=head), eager.decode(tokens, ref, [0, 1], head=head))
    assert compiled.eager_calls == before + 2


def test_compiled_encoder_matches_eager(pair):
    eager, compiled, _ = pair
    mel = torch.randn(2, eager.dims.n_mels, 3000)
    out = compiled.encode(mel)
    assert out.shape == (2, 1500, eager.dims.d_model) and (out - eager.encode(mel)).abs().max() < TOL
    assert ("encoder",) in compiled.compiled
    short = mel[:1, :, :1000]  # the draft's unpadded audio: the same dynamic graph
    assert (compiled.encode(short) - eager.encode(short)).abs().max() < TOL


def test_warm_compiles_nothing_for_eager_engines(base):
    assert Transcriber(EngineConfig(method="ar", compile=False), target=base).warm() == 0.0


def test_eager_flag_and_setting():
    assert not cli._config(parse("transcribe", S, "--eager")).compile
    engine, _, _ = parse_args(cli._ray_builder_args(parse("ray-serve", "--eager")))
    assert engine["compile"] is False


def test_compiled_ar_and_specasr_emit_eager_ar_tokens_on_dev_files(base, tiny_en, manifest, dev_audio):
    """The product's promise with compiled steps, on real speech: AR (one-token steps) and SpecASR
    (verification passes of many widths) pick the same tokens as each other and as eager AR."""
    entries = [e for e in manifest if e.language == "en" and e.duration <= 30][:3]
    audios = [dev_audio[e.id] for e in entries]
    eager = Transcriber(EngineConfig(method="ar", batch_size=1, compile=False), target=base)
    ar = Transcriber(EngineConfig(method="ar", batch_size=1, compile=True), target=base)
    # the same compiled model for both (it is not wrapped twice): each step shape is compiled once
    spec = Transcriber(EngineConfig(method="specasr", batch_size=1, compile=True), target=ar.target, draft=tiny_en)
    assert spec.target.model is ar.target.model
    reference = [t.tokens for t in eager.transcribe(audios, language="en")]
    assert [t.tokens for t in ar.transcribe(audios, language="en")] == reference
    out = spec.transcribe(audios, language="en")
    assert [t.tokens for t in out] == reference
    assert sum(t.stats.accepted_tokens for t in out) > 0  # drafts were verified, not skipped
    model = ar.target.model
    assert model.eager_calls == 0  # every target call of both methods ran a compiled step
    assert any(n >= 8 for _, n in model.calls)  # long chains were verified by compiled graphs


def test_the_draft_step_graph_chooses_like_the_eager_draft(tiny_en):
    """The draft's one-row step as a frozen graph (DraftModel.choices with compile) picks the same two best ids,
    with the same probabilities, as the eager int8 draft at greedy one-token steps: rows of audio of different
    lengths (the graph was traced on the first), a row rolled back, the cache's frames grown later; several
    rows at once through a graph traced for that many rows. That graph reads 64-slot granules of the cache (the
    eager draft, the slots it holds): sums in another order, so after a few steps an int8 activation scale can
    round differently, a probability move by a few percent and a near-tied second choice swap: there, the best
    choice is compared (float32, where both agree: the next test)."""
    from specasr_vllm.config import SpecConfig
    from specasr_vllm.speculation.draft_model import DraftModel

    graph, eager = DraftModel(tiny_en, SpecConfig(), compile=True), DraftModel(tiny_en, SpecConfig())
    torch.manual_seed(5)
    features = [eager.model.encode(torch.randn(1, tiny_en.n_mels, frames)) for frames in (600, 1000, 1400)]
    caches = [graph.empty_cache(1), eager.empty_cache(1)]
    prefix = torch.randint(0, 16000, (1, 6))
    for cache in caches:
        cache.claim(*eager.cross_kv(features[0]))
        eager.decode(prefix, cache, [0])

    def step(rows: list[int], token: int, begin: dict[int, int] | None = None) -> None:
        tokens = torch.full((len(rows), 1), token)
        mask, depths = torch.ones(len(rows), 1, 1, dtype=torch.bool), torch.zeros(len(rows), 1, dtype=torch.long)
        a = graph.choices(tokens, caches[0], rows, mask, depths, begin or {})
        b = eager.choices(tokens, caches[1], rows, mask, depths, begin or {})
        if len(rows) == 1:
            assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-4
        else:  # the best choice, and its probability within a few percent
            assert torch.equal(a[0, ..., 0], b[0, ..., 0]) and (a[1, ..., 0] - b[1, ..., 0]).abs().max() < 0.05
        assert caches[0].lengths(rows) == caches[1].lengths(rows)

    for token in (220, 1029, 50):
        step([0], token)
    for cache in caches:  # a second row with longer audio: the cache's frames grow
        cache.claim(*eager.cross_kv(features[1]))
        eager.decode(prefix[:, :3], cache, [1])
        cache.set_length(0, 5)  # row 0 rolled back
    step([0], 400)  # the graph on the grown cache
    step([1], 400)  # on another row
    for token in (400, 13):
        step([0, 1], token)
    for cache in caches:  # a third row with still longer audio
        cache.claim(*eager.cross_kv(features[2]))
        eager.decode(prefix[:, :2], cache, [2])
    step([0, 1, 2], 7)
    step([0, 1, 2], 50257, begin={1: 0})
    step([1, 2], 9)
    assert graph.graph_calls == 10 and eager.graph_calls == 0 and sorted(graph._block_steps) == [2, 3]


def test_the_draft_block_graph_computes_what_the_eager_draft_computes(tiny_en):
    """Float32: one-token steps of blocks of 2 and 3 rows through graphs traced per number of rows, rows holding
    different audio lengths and contexts that cross the graph's 64-slot granule, Whisper's begin rule on one row:
    the same two best ids and probabilities as the eager draft (the traces took no sizes but the rows' as constants)."""
    from specasr_vllm.config import SpecConfig
    from specasr_vllm.speculation.draft_model import DraftModel

    config = SpecConfig(draft_int8=False, draft_bf16_audio=False)  # float32 throughout: the same sums, to 1e-5
    graph, eager = DraftModel(tiny_en, config, compile=True), DraftModel(tiny_en, config)
    torch.manual_seed(1)
    caches = [graph.empty_cache(1), eager.empty_cache(1)]
    for frames, context in ((600, 58), (1400, 61), (300, 40)):
        features = eager.model.encode(torch.randn(1, tiny_en.n_mels, frames))
        prefix = torch.randint(0, 16000, (1, context))
        for cache in caches:
            eager.decode(prefix, cache, cache.claim(*eager.cross_kv(features)))
    for step in range(12):
        rows = [0, 1, 2] if step % 3 else [1, 2]
        tokens, begin = torch.randint(0, 16000, (len(rows), 1)), ({1: 0} if step == 4 else {})
        a = graph.choices(tokens, caches[0], rows, None, None, begin)
        b = eager.choices(tokens, caches[1], rows, None, None, begin)
        assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-5
    assert caches[0].lengths([0, 1, 2]) == caches[1].lengths([0, 1, 2]) and caches[0].length(0) > 64
    assert graph.graph_calls == 12 and sorted(graph._block_steps) == [2, 3]


def test_the_draft_graph_serves_trees_of_any_width_like_the_eager_draft(tiny_en):
    """One traced graph serves every one-row call (catch-up passes: pending tokens and recycled candidates under
    a tree mask; greedy steps): widths of 1 to 13, random trees, Whisper's begin rule at a position, contexts
    crossing the graph's 64-slot granule, rows holding different audio lengths. In float32 it computes what the
    eager draft computes (the trace took no sizes as constants); the int8 draft's choices can differ where its
    dynamic activation scales round differently, which only changes what is proposed, never the output."""
    from specasr_vllm.config import SpecConfig
    from specasr_vllm.speculation.draft_model import DraftModel

    config = SpecConfig(draft_int8=False, draft_bf16_audio=False)  # float32 throughout: the same sums, to 1e-5
    graph, eager = DraftModel(tiny_en, config, compile=True), DraftModel(tiny_en, config)
    torch.manual_seed(0)
    features = [eager.model.encode(torch.randn(1, tiny_en.n_mels, frames)) for frames in (600, 1400, 300)]
    caches = [graph.empty_cache(1), eager.empty_cache(1)]
    prefix = torch.randint(0, 16000, (1, 40))
    for cache in caches:
        for f in features:
            eager.decode(prefix, cache, cache.claim(*eager.cross_kv(f)))
    for trial in range(36):
        row, n = trial % 3, (1, 2, 5, 13, 1, 3)[trial % 6]
        parents = [-1] + [int(torch.randint(-1, i, ())) if trial % 2 else i - 1 for i in range(1, n)]
        mask, depths = torch.zeros(1, n, n, dtype=torch.bool), torch.zeros(1, n, dtype=torch.long)
        for i, p in enumerate(parents):
            mask[0, i, i] = True
            if p >= 0:
                mask[0, i] |= mask[0, p]
                depths[0, i] = depths[0, p] + 1
        tokens, begin = torch.randint(0, 16000, (1, n)), ({0: n - 1} if trial % 5 == 0 else {})
        a = graph.choices(tokens, caches[0], [row], mask, depths, begin)
        b = eager.choices(tokens, caches[1], [row], mask, depths, begin)
        assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-5
        kept = caches[0].length(row) - n + (int(torch.randint(1, n + 1, ())) if trial % 2 else n)  # as in drafting
        for cache in caches:
            cache.set_length(row, kept)
    assert caches[0].lengths([0, 1, 2]) == caches[1].lengths([0, 1, 2]) and max(caches[0].lengths([0, 1, 2])) > 64
    assert graph.graph_calls == 36 and eager.graph_calls == 0

"""The GPU's decoder steps (``models/step_graphs.py``): what a captured graph replays, run uncaptured on a CPU.

A CPU has nothing to capture, so these tests check the plumbing a graph relies on: the per-call inputs
copied into the graph's own buffers, the cache read and written in place through a ``FixedView`` of a
block of rows, one graph per shape and cache address, the draft's whole step (head, suppression, begin
rules, top two) as one function of tensors, and the decoding they make on real speech. The capture
itself is checked on a GPU (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_random_hf_dir

from specasr_vllm.config import EngineConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.loading import load_whisper
from specasr_vllm.models.step_graphs import bucket
from specasr_vllm.speculation import Drafter
from specasr_vllm.speculation.bridge import make_bridge
from specasr_vllm.speculation.draft_model import DraftModel

TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tmp_path_factory, base_dir):
    """A small random Whisper, eager and through step graphs, and a random audio encoding of 3 rows."""
    eager = load_whisper(make_random_hf_dir(tmp_path_factory.mktemp("rand"), base_dir, d_model=64, heads=2))
    torch.manual_seed(3)
    return eager, CompiledWhisper(eager, graphs=True), eager.encode(torch.randn(3, eager.dims.n_mels, 3000))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() < TOL
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_graphed_steps_decode_like_eager_and_reuse_one_graph_per_shape(pair):
    eager, graphed, features = pair
    ref, cache = (eager.new_cache(features) for _ in range(2))
    tokens = torch.randint(0, 50000, (3, 12))
    _close(graphed.decode(tokens[:, :5], cache), eager.decode(tokens[:, :5], ref))  # a prefix of 3 rows
    for i in range(5, 8):  # one-token steps of 3 rows: one graph
        _close(graphed.decode(tokens[:, i : i + 1], cache), eager.decode(tokens[:, i : i + 1], ref))
    cache.set_length(1, 4)  # a row that accepted less, then every row rolled back to one block
    ref.set_length(1, 4)
    _close(graphed.decode(tokens[:, 8:], cache), eager.decode(tokens[:, 8:], ref))
    assert cache.lengths([0, 1, 2]) == ref.lengths([0, 1, 2]) == [12, 8, 12]
    _close(graphed.decode(tokens[:1, :1], cache, [0]), eager.decode(tokens[:1, :1], ref, [0]))  # one row
    assert len(graphed.graphs) == 4 and graphed.graphs.calls == 6 and graphed.eager_calls == 0
    # a tree over one row: its mask and depths are inputs like any other
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    depths = torch.tensor([[0, 1, 1]])
    _close(graphed.decode(tokens[2:, :3], cache, [2], mask, depths), eager.decode(tokens[2:, :3], ref, [2], mask, depths))
    # what the graphs wrote is what the eager module reads next
    _close(eager.decode(tokens[:, :1], cache), eager.decode(tokens[:, :1], ref))


def test_a_reallocated_cache_gets_its_own_graphs(pair):
    eager, graphed, features = pair
    ref, cache = eager.empty_cache(1), eager.empty_cache(1)
    for c in (ref, cache):
        c.claim(*eager.cross_kv(features[:1]))
    token = torch.tensor([[7]])
    _close(graphed.decode(token, cache, [0]), eager.decode(token, ref, [0]))
    before = len(graphed.graphs)
    for c in (ref, cache):  # a second request: the pool doubles, every tensor moves
        c.claim(*eager.cross_kv(features[1:2]))
    _close(graphed.decode(token, cache, [0]), eager.decode(token, ref, [0]))
    _close(graphed.decode(token, cache, [1]), eager.decode(token, ref, [1]))  # the same shape, another row
    assert len(graphed.graphs) == before + 2


def test_the_draft_step_through_graphs_chooses_like_the_eager_draft(tiny_en):
    """Greedy steps, a catch-up pass with Whisper's begin rules at its last token, and several rows with audio
    of different lengths: the same two best ids and probabilities as the eager draft."""
    config = SpecConfig(draft_int8=False)
    graphed, eager = DraftModel(tiny_en, config, graphs=True), DraftModel(tiny_en, config)
    torch.manual_seed(5)
    features = [eager.model.encode(torch.randn(1, tiny_en.n_mels, frames)) for frames in (600, 1000)]
    caches = [graphed.empty_cache(1), eager.empty_cache(1)]
    for cache in caches:
        cache.claim(*eager.cross_kv(features[0]))

    def step(tokens: torch.Tensor, rows: list[int], begin: dict[int, int]) -> None:
        batch, n = tokens.shape
        mask = torch.ones(n, n, dtype=torch.bool).tril().expand(batch, n, n)
        depths = torch.arange(n).expand(batch, n)
        a = graphed.choices(tokens, caches[0], rows, mask, depths, begin)
        b = eager.choices(tokens, caches[1], rows, mask, depths, begin)
        assert torch.equal(a[0], b[0])
        assert (a[1] - b[1]).abs().max() < 1e-4
        assert caches[0].lengths(rows) == caches[1].lengths(rows)

    step(torch.tensor([[50257, 50362, 464]]), [0], {0: 2})  # a prefix whose last token starts the text
    for token in (220, 1029, 50):
        step(torch.tensor([[token]]), [0], {})
    for cache in caches:  # a second row with longer audio: the cache's frames grow
        cache.claim(*eager.cross_kv(features[1]))
        cache.set_length(0, 5)
    step(torch.tensor([[50257, 50362]]), [1], {0: 1})
    for token in (400, 13):
        step(torch.full((2, 1), token), [0, 1], {})
    assert graphed.graphs.calls == 7 and len(graphed.graphs) == 4  # 3 tokens, 1, then 2 and 2 rows on the new cache


def test_a_run_of_draft_steps_chooses_and_caches_like_single_steps(tiny_en):
    """``DraftModel.run``: each step fed the last one's best token, in one call over a block of two rows with
    audio of different lengths, gives the choices and the cache that one step at a time gives."""
    run = DraftModel(tiny_en, SpecConfig(draft_int8=False, draft_run=5), graphs=True)
    single = DraftModel(tiny_en, SpecConfig(draft_int8=False, draft_run=1), graphs=True)
    assert (run.run_length, single.run_length) == (5, 1)
    torch.manual_seed(6)
    features = [run.model.encode(torch.randn(1, tiny_en.n_mels, frames)) for frames in (600, 1000)]
    caches = [run.empty_cache(2), single.empty_cache(2)]
    for cache in caches:
        for f in features:
            cache.claim(*run.cross_kv(f))
        run.choices(torch.tensor([[50257, 50362, 464], [50257, 50362, 383]]), cache, [0, 1], None, None, {})
        cache.set_length(1, 2)  # rows at different lengths
    out = run.run(torch.tensor([[1029], [220]]), caches[0], [0, 1])
    assert out.shape == (2, 2, 5, 2) and caches[0].lengths([0, 1]) == [8, 7]
    tokens = torch.tensor([[1029], [220]])
    for i in range(5):
        step = single.choices(tokens, caches[1], [0, 1], None, None, {})
        assert torch.equal(out[0, :, i], step[0, :, 0]) and (out[1, :, i] - step[1, :, 0]).abs().max() < 1e-5
        tokens = step[0, :, :, 0].long()
    assert caches[1].lengths([0, 1]) == [8, 7]
    for a, b in zip(caches[0].self_k + caches[0].self_v, caches[1].self_k + caches[1].self_v):
        assert (a[0, :, :8] - b[0, :, :8]).abs().max() < 1e-5 and (a[1, :, :7] - b[1, :, :7]).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="graphs"):
        DraftModel(tiny_en, SpecConfig(draft_run=5)).run(tokens, caches[1], [0, 1])
    caches[0].set_length(0, 444)
    with pytest.raises(ValueError, match="positions"):
        run.run(tokens, caches[0], [0, 1])


def test_runs_of_draft_steps_propose_what_single_steps_propose(base, tiny_en, manifest, dev_audio):
    """Plain speculative decoding (fixed length, so the chains do not depend on measured costs) with the draft
    drafting in runs of 3 steps and one step at a time: the same tokens, passes and drafted and accepted
    tokens; the runs count every step they computed."""
    entry = next(e for e in manifest if e.language == "en" and e.duration <= 30)
    target = dataclasses.replace(base, model=CompiledWhisper(base.model, graphs=True))
    stats = {}
    for run in (1, 3):
        engine = Transcriber(EngineConfig(method="sd", batch_size=1, compile=False), target=target)
        config = SpecConfig.for_method("sd", k=7, draft_run=run, fallback_after=10**6)  # lengths fixed, not timed
        engine.drafter = Drafter(DraftModel(tiny_en, config, graphs=True),
                                 make_bridge(base.tokenizer, tiny_en.tokenizer), config, base.tokenizer.eot,
                                 base.tokenizer.timestamp_begin)
        out = engine.transcribe([dev_audio[entry.id]], language="en")[0]
        stats[run] = (out.tokens, out.stats)
    (tokens1, s1), (tokens3, s3) = stats[1], stats[3]
    assert tokens1 == tokens3
    assert (s1.target_passes, s1.drafted_tokens, s1.accepted_tokens) == \
        (s3.target_passes, s3.drafted_tokens, s3.accepted_tokens)
    assert s1.drafted_tokens > 0 and s3.draft_steps > s1.draft_steps


def test_specasr_through_step_graphs_emits_eager_ar_tokens_on_dev_files(base, tiny_en, manifest, dev_audio):
    """The decoding the GPU path makes, on real speech: target verification passes and the draft's steps
    through step graphs, the same tokens as eager AR."""
    entries = [e for e in manifest if e.language == "en" and e.duration <= 30][:2]
    audios = [dev_audio[e.id] for e in entries]
    reference = [t.tokens for t in Transcriber(EngineConfig(method="ar", batch_size=1, compile=False),
                                               target=base).transcribe(audios, language="en")]
    target = dataclasses.replace(base, model=CompiledWhisper(base.model, graphs=True))
    spec = Transcriber(EngineConfig(method="specasr", batch_size=1, compile=False), target=target)
    config = spec.config.spec
    spec.drafter = Drafter(DraftModel(tiny_en, config, graphs=True), make_bridge(base.tokenizer, tiny_en.tokenizer),
                           config, base.tokenizer.eot, base.tokenizer.timestamp_begin)
    spec.warm()  # every bucketed width, on the engine's and the drafter's caches
    graphs = len(target.model.graphs), len(spec.drafter.draft.graphs)
    out = spec.transcribe(audios, language="en")
    assert [t.tokens for t in out] == reference
    assert sum(t.stats.accepted_tokens for t in out) > 0
    assert target.model.eager_calls == 0 and any(n >= 8 for _, n in target.model.calls)
    assert spec.drafter.draft.graphs.calls > 0
    assert (len(target.model.graphs), len(spec.drafter.draft.graphs)) == graphs  # nothing new to capture
    assert spec.drafter.costs.ar_step > 0  # timed at warm-up: what each request's passes are weighed against


def test_widths_are_bucketed_to_powers_of_two_where_the_cache_has_room(pair):
    """3 new tokens run at width 4 (the padding changes nothing the real tokens see); at the end of the 448
    positions a call runs at its own width."""
    assert [bucket(n, 448) for n in (1, 2, 3, 5, 9, 17, 33)] == [1, 2, 4, 8, 16, 32, 64]
    assert bucket(5, 6) == 5 and bucket(5, 8) == 8
    eager, graphed, features = pair
    ref, cache = (eager.new_cache(features[:1]) for _ in range(2))
    tokens = torch.randint(0, 50000, (1, 7))
    _close(graphed.decode(tokens[:, :3], cache), eager.decode(tokens[:, :3], ref))
    before = len(graphed.graphs)
    _close(graphed.decode(tokens[:, 3:7], cache), eager.decode(tokens[:, 3:7], ref))  # 4 tokens: the same graph
    assert len(graphed.graphs) == before and cache.length(0) == ref.length(0) == 7
    for c in (cache, ref):
        c.set_length(0, 444)
    _close(graphed.decode(tokens[:, :3], cache), eager.decode(tokens[:, :3], ref))  # 4 slots left: width 4
    _close(graphed.decode(tokens[:, :1], cache), eager.decode(tokens[:, :1], ref))
    for c in (cache, ref):
        c.set_length(0, 445)
    _close(graphed.decode(tokens[:, :3], cache), eager.decode(tokens[:, :3], ref))  # 3 slots left: width 3
    assert len(graphed.graphs) == before + 2  # (1 row, 1 token) and (1 row, 3 tokens)

"""Property: every speculative method and switch combination gives exactly the target's greedy output.

Small random-initialised Whisper pairs, with the same tokenizer (the draft a perturbed copy of the
target, so drafts are often right) and with different tokenizers (a base-vocabulary target, a
tiny.en-vocabulary draft, bridged through text), batches of 1-4, short output limits.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_random_hf_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specasr_vllm.config import DRAFT_MARGIN_FRAMES, HOP_LENGTH, SpecConfig
from specasr_vllm.engine.ar import decode_ar
from specasr_vllm.engine.speculative import decode_speculative
from specasr_vllm.models.registry import ASRModel, load_model
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.speculation import Drafter
from specasr_vllm.speculation.adaptive import PassLine

MAX_POSITIONS = 36


@pytest.fixture(scope="module")
def pair_models(tmp_path_factory, base_dir, tiny_en_dir):
    target = load_model(str(make_random_hf_dir(tmp_path_factory.mktemp("t"), base_dir, seed=1)))
    noisy = copy.deepcopy(target)
    with torch.no_grad():
        for p in noisy.model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    other = load_model(str(make_random_hf_dir(tmp_path_factory.mktemp("d"), tiny_en_dir, seed=2)))
    return {"same": (target, noisy), "other": (target, other)}


def run_both(target: ASRModel, draft: ASRModel, spec: SpecConfig, batch: int, seed: int, timestamps: bool = False):
    """AR and speculative outputs as token lists (log-probabilities checked to agree on the way); every row
    drafts (``decode_speculative`` drafts for every row it is given: the engine decides which batches do)."""
    torch.manual_seed(seed)
    mel = torch.randn(batch, 80, 3000)
    features = target.model.encode(mel)
    rules = WhisperRules(target)
    langs = ["en", "de", "fr", "en"][:batch]
    prefixes = [target.tokenizer.prefix(lang, timestamps=timestamps) for lang in langs]
    reference = decode_ar(target, rules, features, prefixes, max_positions=MAX_POSITIONS, timestamps=timestamps)
    drafter = Drafter.build(draft, target.tokenizer, spec)
    keys = [f"r{i}" for i in range(batch)]  # any hashable ids
    for key, lang, m in zip(keys, langs, mel):
        drafter.start(key, lang, "transcribe", timestamps, mel=m, audio=None if not spec.draft_unpadded else
                      np.zeros(1000 * HOP_LENGTH - DRAFT_MARGIN_FRAMES * HOP_LENGTH, dtype=np.float32))
    out = decode_speculative(target, rules, drafter, features, prefixes, keys,
                             max_positions=MAX_POSITIONS, timestamps=timestamps)
    stats = drafter.release(keys)
    assert [o.passes for o in out] == [stats[key].target_passes for key in keys]  # the host and drafter agree
    assert [r.passes for r in reference] == [len(r.tokens) + (len(r.tokens) < MAX_POSITIONS - len(p))
                                             for r, p in zip(reference, prefixes)]  # AR: a pass per token
    for ar, spec_out in zip(reference, out):
        if ar.tokens == spec_out.tokens:
            assert spec_out.logprobs == pytest.approx(ar.logprobs, abs=1e-3)
            assert spec_out.no_speech_prob == pytest.approx(ar.no_speech_prob, abs=1e-5)
    return [d.tokens for d in reference], [d.tokens for d in out], [stats[key] for key in keys]


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vocab=st.sampled_from(["same", "other"]),
    adaptive=st.booleans(), recycling=st.booleans(), tree=st.booleans(), auto=st.booleans(),
    k=st.integers(1, 8), batch=st.integers(1, 4), seed=st.integers(0, 10_000),
    int8=st.booleans(), unpadded=st.booleans(), draft_vocab=st.sampled_from([None, 16384, 300]),
    tree_depth=st.integers(1, 3), tree_branches=st.integers(1, 3), timestamps=st.booleans(),
)
def test_speculative_equals_target_greedy(pair_models, vocab, adaptive, recycling, tree, auto, k, batch, seed,
                                          int8, unpadded, draft_vocab, tree_depth, tree_branches, timestamps):
    target, draft = pair_models[vocab]
    spec = SpecConfig(adaptive=adaptive, recycling=recycling, tree=tree, auto_threshold=auto, k=k,
                      draft_int8=int8, draft_unpadded=unpadded, draft_vocab=draft_vocab, max_draft=10,
                      tree_depth=tree_depth, tree_branches=tree_branches, tree_threshold=0.99, fallback_after=10**6)
    reference, out, stats = run_both(target, draft, spec, batch, seed, timestamps)
    assert out == reference
    for s, ref in zip(stats, reference):
        assert s.output_tokens == len(ref)
        assert s.accepted_tokens <= s.drafted_tokens


def test_same_vocabulary_drafts_get_accepted(pair_models):
    """The perturbed copy agrees with the target often, so the machinery is really exercised."""
    target, draft = pair_models["same"]
    # random output uses all ids; a fixed threshold keeps the drafting independent of measured timings
    spec = SpecConfig(tree=True, fallback_after=10**6, tree_threshold=0.99, draft_vocab=None, auto_threshold=False,
                      threshold=0.1)
    reference, out, stats = run_both(target, draft, spec, 4, 0)
    assert out == reference
    assert sum(s.accepted_tokens for s in stats) > 0.5 * sum(len(r) for r in reference)
    assert sum(s.target_passes for s in stats) < sum(len(r) for r in reference)


def test_fallback_to_ar_when_acceptance_collapses(pair_models):
    target, draft = pair_models["other"]  # random weights on both sides: almost nothing accepted
    reference, out, stats = run_both(target, draft, SpecConfig(fallback_after=2), 2, 3)
    assert out == reference
    english, german = stats  # rows run with languages en, de
    assert english.fallback.startswith("drafting does not pay") and english.target_passes > 2
    assert german.fallback == "draft does not serve this language" and german.drafted_tokens == 0


@pytest.mark.parametrize("pass_ms,pays", [(12, True), (50, False)])
def test_drafting_stops_when_its_passes_emit_slower_than_ar_steps(pair_models, pass_ms, pays):
    """The measured rule (``Drafter.pays``): 4 tokens per pass (3 drafted and accepted, the target's own) against
    a 10 ms AR step pay at 12 ms a pass (40 ms of AR's work) and do not at 50 ms (with ``max_loss``); an AR step
    is learnt from passes that proposed nothing, at batch widths that draft."""
    target, draft = pair_models["same"]
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(adaptive=False, k=3, recycling=False, fallback_after=3,
                                                                draft_vocab=None))
    torch.manual_seed(0)
    for key in ("r", "s"):
        drafter.start(key, "en", mel=torch.randn(80, 3000))
    drafter.feedback({"r": [400], "s": [400]}, pass_seconds=0.5)  # two rows: wider than max_batch, not an AR step
    assert drafter.costs.ar_step is None
    drafter.release(["s"])
    drafter.feedback({"r": [401]}, pass_seconds=0.010)  # a pass that proposed nothing: an AR step
    assert drafter.costs.ar_step == pytest.approx(0.010)
    out = [400, 401]
    for _ in range(3):
        tree = drafter.propose({"r": out}, {"r": 20})["r"]
        assert len(tree) == 3
        emitted = [tree.tokens[i] for i in range(3)] + [402]  # the chain, all accepted, then the target's token
        out += emitted
        drafter.feedback({"r": emitted}, seconds=pass_ms / 2000, pass_seconds=pass_ms / 1000)
    assert len(drafter.propose({"r": out}, {"r": 20})["r"]) == (3 if pays else 0)  # judged after 3 passes
    # the stopping rule's price: the three passes of one drafting request (not the two-row pass, nor the AR step)
    assert drafter.costs.passes.passes == 3 and drafter.costs.passes.seconds == pytest.approx(
        pass_ms / 1000 * (1 + PassLine.FORGET + PassLine.FORGET ** 2))
    stats = drafter.release(["r"])["r"]
    assert (stats.fallback is None) == pays and stats.accepted_tokens == 9
    if not pays:
        assert stats.fallback == "drafting does not pay (4.00 tokens per pass)"


@pytest.mark.parametrize("pass_ms,pays", [(30, True), (45, False)])
def test_requests_that_share_their_passes_are_judged_together(pair_models, pass_ms, pays):
    """Two requests in one batch, AR at 6 ms a row at two rows: one emits 4 tokens a pass, the other 1 (every draft
    rejected). Together they earn 30 ms of AR's work a pass, so at 30 ms a pass both keep drafting (the poor one,
    judged alone on its 15 ms share, would have fallen back and left the other's passes as wide as before), and at
    45 ms both fall back, in the same pass, with the reason naming the group."""
    target, draft = pair_models["same"]
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(adaptive=False, k=3, recycling=False, fallback_after=3,
                                                                draft_vocab=None, max_batch=2))
    torch.manual_seed(0)
    drafter.costs.observe(ar_step=0.010)
    drafter.costs.observe(ar_step=0.006, rows=2)
    keys = ("good", "poor")
    for key in keys:
        drafter.start(key, "en", mel=torch.randn(80, 3000))
    out = {key: [400] for key in keys}
    drafter.feedback({key: [400] for key in keys})
    for _ in range(3):
        trees = drafter.propose(out, {key: 20 for key in keys})
        assert all(len(trees[key]) == 3 for key in keys)
        good = [trees["good"].tokens[i] for i in range(3)] + [402]  # the chain, all accepted, then the target's own
        poor = [404 if trees["poor"].tokens[0] == 403 else 403]  # the first draft token rejected
        out["good"] += good
        out["poor"] += poor
        drafter.feedback({"good": good, "poor": poor}, seconds=pass_ms / 2000, pass_seconds=pass_ms / 1000)
    trees = drafter.propose(out, {key: 20 for key in keys})
    assert [len(trees[key]) for key in keys] == ([3, 3] if pays else [0, 0])
    stats = drafter.release(list(keys))
    if pays:
        assert stats["good"].fallback is None and stats["poor"].fallback is None
    else:
        assert stats["good"].fallback == "drafting does not pay (4.00 tokens per pass, 2 requests judged together)"
        assert stats["poor"].fallback == "drafting does not pay (1.00 tokens per pass, 2 requests judged together)"


def test_where_drafting_has_not_paid_lately_only_probes_draft(pair_models):
    """Requests at 50 ms a pass for 4 tokens against a 10 ms AR step: once drafting paid for none of the last 4
    judged (each fell back at its last pass, the ``fallback_after``-th), new requests decode as AR from the start (no draft encoder,
    no proposal) except every ``probe_every``-th; a probe for which it pays turns drafting back on."""
    target, draft = pair_models["same"]
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(adaptive=False, k=3, recycling=False,
                                                                fallback_after=2, probe_every=3, draft_vocab=None))
    torch.manual_seed(0)
    drafter.costs.observe(ar_step=0.010)

    def request(key: str, n: int, pass_ms: float) -> bool:
        if not drafter.start(key, "en", mel=torch.randn(80, 3000)):
            return False
        out = [400]
        drafter.feedback({key: out[:]})
        for _ in range(n):
            tree = drafter.propose({key: out}, {key: 20})[key]
            emitted = [tree.tokens[i] for i in range(len(tree))] + [402]
            out += emitted
            drafter.feedback({key: emitted}, pass_seconds=pass_ms / 1000)
        drafter.finish([key])
        drafter.release([key])
        return True

    assert [request(f"slow{i}", 2, 50) for i in range(4)] == [True] * 4
    assert not drafter.paid_lately()
    assert [request(f"r{i}", 2, 50) for i in range(6)] == [False, False, True, False, False, True]
    assert drafter.start("declined", "en", mel=torch.randn(80, 3000)) is False
    assert drafter.stats("declined").fallback == "drafting has not paid lately"
    assert drafter.propose({"declined": [400]}, {"declined": 20})["declined"].tokens == []
    assert drafter.requests["declined"].row is None  # no draft encoder ran
    assert not request("declined again", 3, 5)
    assert request("probe", 3, 5)  # the third since the last probe; it pays
    assert drafter.paid_lately() and request("again", 2, 50)
    # a batch asks once (``admit``) and passes the answer to each of its rows
    assert drafter.start("in a batch declined", "en", mel=torch.randn(80, 3000), admitted=False) is False
    assert drafter.stats("in a batch declined").fallback == "drafting has not paid lately"


def test_feedback_off_the_proposed_tree_is_logged_not_fatal(pair_models, caplog):
    """A host that verified something other than the proposal (a bug there) must not stop the engine."""
    target, draft = pair_models["same"]
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(fallback_after=10**6, draft_vocab=None))
    torch.manual_seed(0)
    drafter.start("r", "en", mel=torch.randn(80, 3000))
    drafter.feedback({"r": [target.tokenizer.eot - 1]})  # the prefill's token
    tree = drafter.propose({"r": [target.tokenizer.eot - 1]}, {"r": 4})["r"]
    assert len(tree) > 0
    wrong = next(t for t in range(100) if tree.child(-1, t) is None)
    drafter.feedback({"r": [wrong, 7]})  # claims a drafted token the tree does not have
    stats = drafter.release(["r"])["r"]
    assert "not a child" in caplog.text
    assert (stats.target_passes, stats.output_tokens, stats.drafted_tokens) == (2, 3, 0)


def test_a_pass_with_draft_work_is_no_ar_step_even_when_its_tree_is_empty(pair_models):
    """An empty tree from a request that still drafts may have cost draft calls (its chain stopped at once): such
    a pass does not price an AR step. A declined request's empty tree cost nothing, so its pass does."""
    target, draft = pair_models["same"]
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(draft_vocab=None))
    drafter.start("r", "en", mel=torch.randn(80, 3000))
    assert len(drafter.propose({"r": [400]}, {"r": 0})["r"]) == 0  # drafting, but no room for a draft this pass
    drafter.feedback({"r": [401]}, pass_seconds=0.030)
    assert drafter.costs.ar_step is None
    assert drafter.costs.passes.passes == 1 and drafter.costs.passes.nodes == 0  # a drafting pass of no nodes
    drafter.decline(["r"], "the host's choice")
    assert len(drafter.propose({"r": [400, 401]}, {"r": 20})["r"]) == 0
    drafter.feedback({"r": [402]}, pass_seconds=0.010)
    assert drafter.costs.ar_step == pytest.approx(0.010)
    assert drafter.costs.passes.passes == 1  # an AR step prices no drafting pass


def test_requests_drafting_together_get_trees_of_at_most_batch_draft_nodes(pair_models):
    """Every row of a pass is verified as wide as its longest tree, so where several requests draft, each tree is
    capped at ``batch_draft`` nodes; a request drafting alone is not."""
    target, draft = pair_models["same"]
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(adaptive=False, k=5, recycling=False, batch_draft=2,
                                                                max_batch=2, draft_vocab=None))
    torch.manual_seed(0)
    for key in ("r", "s"):
        drafter.start(key, "en", mel=torch.randn(80, 3000))
    trees = drafter.propose({"r": [400], "s": [401]}, {"r": 20, "s": 20})
    assert [len(trees[k]) for k in ("r", "s")] == [2, 2]
    drafter.release(["s"])
    assert len(drafter.propose({"r": [400] + trees["r"].tokens}, {"r": 20})["r"]) == 5


def test_drafting_in_a_batch_is_judged_against_ar_at_that_width(pair_models):
    """Two requests drafting together, 4 tokens each per 40 ms pass (20 ms a row). With only one row's AR step
    measured (12 ms), that is AR's price a row at two rows too: 48 ms of AR's work against 20 ms, drafting pays.
    With AR measured at 4 ms a row for two rows, AR would emit those 4 tokens in 16 ms: it does not pay."""
    target, draft = pair_models["same"]

    def judged(two_rows: float | None) -> list[str | None]:
        drafter = Drafter.build(draft, target.tokenizer, SpecConfig(adaptive=False, k=3, recycling=False,
                                                                    fallback_after=3, max_batch=2, draft_vocab=None))
        drafter.costs.observe(ar_step=0.012)
        if two_rows is not None:
            drafter.costs.observe(ar_step=two_rows, rows=2)
        torch.manual_seed(0)
        out = {}
        for key in ("r", "s"):
            drafter.start(key, "en", mel=torch.randn(80, 3000))
            out[key] = [400]
        for _ in range(3):
            trees = drafter.propose(out, {"r": 20, "s": 20})
            emitted = {k: [trees[k].tokens[i] for i in range(3)] + [402] for k in out}
            for k in out:
                out[k] += emitted[k]
            drafter.feedback(emitted, pass_seconds=0.040)
        return [s.fallback for s in drafter.release(["r", "s"]).values()]

    assert judged(None) == [None, None]  # priced at one row's 12 ms: pays
    # 4 tokens x 4 ms < 20 ms x 0.9: the two fall back together
    assert judged(0.004) == ["drafting does not pay (4.00 tokens per pass, 2 requests judged together)"] * 2

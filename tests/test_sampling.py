"""Seeded temperature sampling: it draws from softmax(masked logits / T), its rejection view is
speculative sampling's lossless rule, and speculative decoding reproduces AR token for token per seed.

Every statistical test uses a fixed set of seeds, so it is deterministic; the significance level
(0.001) says how unlucky a correct implementation would have to be for the chosen seeds to fail.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import make_random_hf_dir
from scipy import stats

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import SpecConfig
from specasr_vllm.engine.ar import decode_ar
from specasr_vllm.engine.speculative import decode_speculative
from specasr_vllm.models.registry import ASRModel, load_model
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.models.sampling import Sampling
from specasr_vllm.speculation import Drafter

ALPHA = 0.001
LOGITS = torch.tensor([3.0, 2.2, 1.5, 1.0, 0.0, -1.0, -2.5, float("-inf")])  # the last one is suppressed


def _pooled(observed: Counter, probs: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Observed and expected counts per category, categories expected fewer than 5 times pooled into
    one (which joins the smallest category if it is itself under 5), as the chi-square test needs."""
    assert all(probs[t] > 0 for t in observed), "a token of probability 0 was drawn"
    expected = probs.double() * n
    big = [t for t in range(len(probs)) if expected[t] >= 5]
    if not big:  # too few draws for any category: one category, nothing to test
        return np.array([float(n)]), np.array([float(n)])
    f_obs = [float(observed[t]) for t in big]
    f_exp = [float(expected[t]) for t in big]
    rest_obs, rest_exp = n - sum(f_obs), n - sum(f_exp)
    if rest_exp >= 5:
        f_obs.append(rest_obs)
        f_exp.append(rest_exp)
    else:
        smallest = int(np.argmin(f_exp))
        f_obs[smallest] += rest_obs
        f_exp[smallest] += rest_exp
    return np.array(f_obs), np.array(f_exp)


def _draws(temperature: float, seeds: int, positions: int) -> torch.Tensor:
    """Gumbel-max tokens of ``LOGITS``: (seeds, positions)."""
    sampling = Sampling(temperature, list(range(seeds)))
    rows = [r for r in range(seeds) for _ in range(positions)]
    noise = sampling.noise(rows, list(range(positions)) * seeds, len(LOGITS), "cpu")
    return (LOGITS + noise).argmax(-1).view(seeds, positions)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_max_draws_from_the_tempered_softmax(temperature):
    """200 seeds x 100 positions: every (seed, position) is one draw from softmax(logits / T)."""
    tokens = _draws(temperature, 200, 100).flatten()
    f_obs, f_exp = _pooled(Counter(tokens.tolist()), (LOGITS.double() / temperature).softmax(-1), len(tokens))
    result = stats.chisquare(f_obs, f_exp)
    assert result.pvalue > ALPHA, (temperature, result)


def test_consecutive_positions_of_a_row_are_independent():
    """The joint of positions 0 and 1 over 20000 seeds is the product of the marginals (noise keyed by
    position: no reuse, no correlation)."""
    tokens = _draws(1.0, 20_000, 2)
    q = LOGITS.double().softmax(-1)
    vocab = len(LOGITS)
    observed = Counter((tokens[:, 0] * vocab + tokens[:, 1]).tolist())
    f_obs, f_exp = _pooled(observed, (q[:, None] * q[None, :]).flatten(), len(tokens))
    result = stats.chisquare(f_obs, f_exp)
    assert result.pvalue > ALPHA, result


def test_rejection_view_is_speculative_sampling():
    """For a fixed draft token x: accepted with probability q(x); a rejection emits q without x, renormalised."""
    temperature, draft = 1.0, 1
    tokens = _draws(temperature, 20_000, 1).flatten()
    q = (LOGITS.double() / temperature).softmax(-1)
    accepted = int((tokens == draft).sum())
    binom = stats.binomtest(accepted, len(tokens), float(q[draft]))
    assert binom.pvalue > ALPHA, (accepted, len(tokens), float(q[draft]), binom)
    rejected = tokens[tokens != draft].tolist()
    residual = q.clone()
    residual[draft] = 0
    f_obs, f_exp = _pooled(Counter(rejected), residual / residual.sum(), len(rejected))
    result = stats.chisquare(f_obs, f_exp)
    assert result.pvalue > ALPHA, result


def test_noise_is_keyed_by_seed_and_position_only():
    sampling = Sampling(0.7, [11, 12, 11])
    alone = sampling.noise([1], [3], 50, "cpu")
    batch = sampling.noise([0, 1, 1, 0, 2], [3, 3, 4, 3, 3], 50, "cpu")
    assert batch.dtype == torch.float32 and batch.shape == (5, 50)
    assert torch.equal(batch[1], alone[0])  # the rest of the batch does not matter
    assert torch.equal(batch[0], batch[3]) and torch.equal(batch[0], batch[4])  # same seed, same position
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])
    assert torch.allclose(Sampling(1.4, [12]).noise([0], [3], 50, "cpu"), 2 * alone)  # T scales the noise
    assert torch.isfinite(batch).all()
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            Sampling(bad, [0])


# ---- small random models: the rules, and AR against speculation with trees and timestamps ----------------

MAX_POSITIONS = 36


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory, base_dir) -> tuple[ASRModel, ASRModel]:
    target = load_model(str(make_random_hf_dir(tmp_path_factory.mktemp("t"), base_dir, seed=1)))
    draft = copy.deepcopy(target)  # a perturbed copy: drafts are often right, so trees get verified
    with torch.no_grad():
        for p in draft.model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return target, draft


def test_pick_samples_after_the_rules_and_reports_the_unscaled_logprob(random_pair):
    target, _ = random_pair
    rules = WhisperRules(target)
    vocab = target.model.dims.vocab_size
    torch.manual_seed(0)
    logits = torch.randn(6, vocab)
    greedy = rules.pick(logits, first=True)
    assert rules.pick(logits, first=True, noise=None) == greedy
    noise = Sampling(1.0, list(range(6))).noise(list(range(6)), [0] * 6, vocab, "cpu")
    noise[:, rules.eot] = 1e9  # end-of-text is begin-suppressed: no noise can bring it back
    tokens, logprobs = rules.pick(logits, first=True, noise=noise)
    masked = rules.mask(logits, True)
    assert tokens == (masked + noise).argmax(-1).tolist() and rules.eot not in tokens
    assert tokens != greedy[0]  # really sampled
    expected = masked.log_softmax(-1)[torch.arange(6), torch.tensor(tokens)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-5)


def test_suppression_by_columns_equals_the_boolean_rule(random_pair):
    """``Suppression.mask`` writes the suppressed columns (and the begin ones on first rows) instead of selecting
    over the whole vocabulary: the same logits as the rule's definition, for a bool and for per-row flags;
    ``choose`` + ``logprobs`` of some rows equal ``pick``'s."""
    target, _ = random_pair
    rules = WhisperRules(target)
    s = rules.suppression
    torch.manual_seed(1)
    logits = torch.randn(5, target.model.dims.vocab_size)
    first = torch.tensor([True, False, False, True, False])
    for flags in (first, True, False):
        forbidden = torch.where(torch.as_tensor(flags)[..., None], s.begin_suppress, s.suppress)
        assert torch.equal(s.mask(logits, flags), logits.masked_fill(forbidden, float("-inf")))
    tokens, logprobs = rules.pick(logits, first)
    masked, chosen = rules.choose(logits, first)
    assert chosen == tokens and rules.eot not in [tokens[0], tokens[3]]
    assert rules.logprobs(masked, [3, 1], [tokens[3], tokens[1]]) == [logprobs[3], logprobs[1]]
    expected = s.mask(logits, first).log_softmax(-1).max(-1).values
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-5)


def test_choose_skips_the_masked_copy_only_when_no_favourite_is_suppressed(random_pair):
    """Greedy ``choose`` with the suppression alone: whether or not some position's favourite is a suppressed id
    (or ties with one below it), the tokens are the masked argmax and ``logprobs`` equals ``pick``'s."""
    target, _ = random_pair
    rules = WhisperRules(target)
    banned = sorted(rules.suppression.suppressed)[:2]
    torch.manual_seed(2)
    logits = torch.randn(4, target.model.dims.vocab_size)
    clean = logits.clone()
    clean[:, banned] = -10.0  # no favourite is suppressed: the logits come back unmasked
    dirty = logits.clone()
    dirty[1, banned[0]] = 50.0  # row 1's favourite is suppressed
    dirty[2, banned[0]] = dirty[2].max()  # row 2's favourite ties with a suppressed id
    for given in (clean, dirty):
        masked, chosen = rules.choose(given)
        assert chosen == rules.mask(given).argmax(-1).tolist()
        tokens, logprobs = rules.pick(given)
        assert chosen == tokens and not rules.suppression.suppressed.intersection(chosen)
        assert rules.logprobs(masked, [0, 1, 2, 3], chosen) == pytest.approx(logprobs, abs=1e-6)
    assert rules.choose(clean)[0] is clean and rules.choose(dirty)[0] is not dirty


def _decode_both(target: ASRModel, draft: ASRModel, mel: torch.Tensor, sampling: Sampling, timestamps: bool):
    """AR and speculative decodes of the same windows with the same seeds, and the drafter's statistics."""
    batch = len(sampling.seeds)
    features = target.model.encode(mel)
    rules = WhisperRules(target)
    prefixes = [target.tokenizer.prefix("en", timestamps=timestamps)] * batch
    reference = decode_ar(target, rules, features, prefixes, MAX_POSITIONS, timestamps, sampling=sampling)
    spec = SpecConfig(tree=True, fallback_after=10**6, tree_threshold=0.99, draft_vocab=None, auto_threshold=False,
                      threshold=0.1, tree_branches=2, tree_depth=2, max_batch=batch)
    drafter = Drafter.build(draft, target.tokenizer, spec)
    keys = list(range(batch))
    for key, m in zip(keys, mel):
        drafter.start(key, "en", "transcribe", timestamps, mel=m)
    out = decode_speculative(target, rules, drafter, features, prefixes, keys, MAX_POSITIONS,
                             timestamps=timestamps, sampling=sampling)
    greedy = decode_ar(target, rules, features, prefixes, MAX_POSITIONS, timestamps)
    return reference, out, drafter.release(keys), greedy


@pytest.mark.parametrize("declined", [[0, 1], [1]])
def test_once_no_row_drafts_the_rest_is_ar_steps(random_pair, monkeypatch, declined):
    """Rows that never draft (declined before the first pass): with every row declined the drafter is never asked
    for a tree and each pass is one AR step; with one row still drafting, proposals go on. Either way the tokens
    and log-probabilities are AR's, and the statistics count every pass and token."""
    target, draft = random_pair
    torch.manual_seed(4)
    mel = torch.randn(2, target.n_mels, 3000)
    features = target.model.encode(mel)
    rules = WhisperRules(target)
    prefixes = [target.tokenizer.prefix("en")] * 2
    reference = decode_ar(target, rules, features, prefixes, MAX_POSITIONS)
    drafter = Drafter.build(draft, target.tokenizer, SpecConfig(draft_vocab=None, max_batch=2, fallback_after=10**6))
    for key, m in zip((0, 1), mel):
        drafter.start(key, "en", mel=m)
    drafter.decline(declined, "test")
    proposals = []
    propose = drafter.propose
    monkeypatch.setattr(drafter, "propose", lambda *a: proposals.append(1) or propose(*a))
    out = decode_speculative(target, rules, drafter, features, prefixes, [0, 1], MAX_POSITIONS)
    assert [o.tokens for o in out] == [r.tokens for r in reference]
    assert [o.logprobs for o in out] == [pytest.approx(r.logprobs, abs=1e-4) for r in reference]
    assert bool(proposals) == (len(declined) < 2)
    stats = drafter.release([0, 1])
    for key in declined:
        assert stats[key].target_passes == reference[key].passes == out[key].passes
        assert stats[key].output_tokens == len(reference[key].tokens) and stats[key].drafted_tokens == 0


@pytest.mark.parametrize("timestamps", [False, True])
def test_speculative_sampling_equals_ar_on_random_models(random_pair, timestamps):
    target, draft = random_pair
    torch.manual_seed(5)
    mel = torch.randn(4, 80, 3000)
    reference, out, final, greedy = _decode_both(target, draft, mel, Sampling(1.0, [3, 141, 59, 26]), timestamps)
    assert [o.tokens for o in out] == [r.tokens for r in reference]
    for o, r in zip(out, reference):
        assert o.logprobs == pytest.approx(r.logprobs, abs=1e-3)
    assert sum(s.accepted_tokens for s in final.values()) > 0  # verification, not only bonus tokens
    assert sum(s.accepted_tokens for s in final.values()) < sum(s.drafted_tokens for s in final.values())
    assert [g.tokens for g in greedy] != [r.tokens for r in reference]  # T = 1 really sampled


def test_same_seed_same_tokens_whatever_the_batch(random_pair):
    target, _ = random_pair
    rules = WhisperRules(target)
    torch.manual_seed(6)
    features = target.model.encode(torch.randn(1, 80, 3000)).expand(3, -1, -1)
    prefixes = [target.tokenizer.prefix("en")] * 3
    batch = decode_ar(target, rules, features, prefixes, MAX_POSITIONS, sampling=Sampling(1.0, [7, 8, 7]))
    alone = decode_ar(target, rules, features[:1], prefixes[:1], MAX_POSITIONS, sampling=Sampling(1.0, [8]))
    assert batch[0].tokens == batch[2].tokens and batch[1].tokens == alone[0].tokens
    assert batch[0].tokens != batch[1].tokens
    with pytest.raises(ValueError, match="seeds"):
        decode_ar(target, rules, features, prefixes, MAX_POSITIONS, sampling=Sampling(1.0, [7]))


# ---- real weights: whisper-base verified against whisper-tiny.en drafts ---------------------------------

REAL_FILE = "ls-4406-16882-0008"  # "And relations lie ...": position 2 is uncertain (lie 0.54, like 0.30, by, ",")
POSITION = 2


@pytest.fixture(scope="module")
def real_window(base, tiny_en, manifest, dev_audio):
    """The file's audio, log-mel, whisper-base features and prefix, and one drafter for the tests."""
    entry = next(e for e in manifest if e.id == REAL_FILE)
    audio = dev_audio[entry.id]
    mel = log_mel_spectrogram(audio, base.n_mels)
    features = base.model.encode(mel[None])
    drafter = Drafter.build(tiny_en, base.tokenizer, SpecConfig(max_batch=64))  # rows of seeds draft together
    return audio, mel, features, base.tokenizer.prefix("en"), drafter


_keys = itertools.count()


def _speculative(base, real_window, drafter: Drafter, sampling: Sampling, max_positions: int, cache=None):
    audio, mel, features, prefix, _ = real_window
    rows = len(sampling.seeds)
    keys = [next(_keys) for _ in range(rows)]
    for key in keys:
        drafter.start(key, "en", mel=mel, audio=audio)
    out = decode_speculative(base, WhisperRules(base), drafter, features.expand(rows, -1, -1), [prefix] * rows,
                             keys, max_positions, cache=cache, sampling=sampling)
    return out, drafter.release(keys)


@pytest.mark.real
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_speculative_sampling_equals_ar_on_speech(base, real_window, temperature):
    _, _, features, prefix, drafter = real_window
    seeds = [0, 1, 2, 3]
    sampling = Sampling(temperature, seeds)
    max_positions = len(prefix) + 64  # a sampled loop, if one happens, stays short
    reference = decode_ar(base, WhisperRules(base), features.expand(len(seeds), -1, -1), [prefix] * len(seeds),
                          max_positions, sampling=sampling)
    out, final = _speculative(base, real_window, drafter, sampling, max_positions)
    assert [o.tokens for o in out] == [r.tokens for r in reference]
    assert sum(s.accepted_tokens for s in final.values()) > 0
    if temperature == 1.0:  # different seeds, different transcripts
        assert len({tuple(r.tokens) for r in reference}) > 1


@pytest.mark.real
def test_verified_position_is_distributed_as_the_target(base, tiny_en, real_window, monkeypatch):
    """Position 2 over 256 seeded speculative runs at T = 1, each stratified by its first two sampled
    tokens, follows the target's exact softmax of the masked logits after them (chi-square summed
    over the strata with enough runs). Plain drafting of two tokens with four tokens to emit: the
    first pass verifies drafts at positions 1 and 2, and if position 1 is rejected, the second pass
    verifies a draft at position 2; either way a drafted token is verified there."""
    _, _, features, prefix, _ = real_window
    drafter = Drafter.build(tiny_en, base.tokenizer, SpecConfig.for_method("sd", k=2, max_batch=10**6))
    # every run decodes the same window: the target's cross-attention K/V and the draft's encoder
    # output are computed once, not once per seed (they are most of the time otherwise)
    cross_kv = base.model.cross_kv(features)
    monkeypatch.setattr(base.model, "cross_kv", lambda f: tuple(t.expand(-1, f.shape[0], -1, -1, -1)
                                                                for t in cross_kv))
    draft_encode, draft_features = drafter.draft.encode, []
    monkeypatch.setattr(drafter.draft, "encode", lambda mel: draft_features[0] if draft_features else
                        draft_features.append(draft_encode(mel)) or draft_features[0])
    rows, runs = 16, 16
    cache = base.model.empty_cache(rows)
    samples, drafted, accepted = [], 0, 0
    for run in range(runs):
        seeds = list(range(run * rows, (run + 1) * rows))
        out, final = _speculative(base, real_window, drafter, Sampling(1.0, seeds), len(prefix) + POSITION + 2, cache)
        samples += [o.tokens[: POSITION + 1] for o in out if len(o.tokens) > POSITION]
        drafted += sum(s.drafted_tokens for s in final.values())
        accepted += sum(s.accepted_tokens for s in final.values())
    assert len(samples) > 0.9 * rows * runs
    assert drafted >= 2 * len(samples)  # every run drafted positions 1 and 2
    assert 0 < accepted < drafted  # and the target kept some drafts and rejected others
    strata = Counter(tuple(t[:POSITION]) for t in samples)
    tested = [context for context, n in strata.items() if n >= 10]  # fewer cannot fill two categories
    rules = WhisperRules(base)
    logits = base.model.decode(torch.tensor([prefix + list(c) for c in tested]), base.model.new_cache(
        features.expand(len(tested), -1, -1)))[:, -1]
    probs = rules.mask(logits, False).double().softmax(-1)
    statistic, dof = 0.0, 0
    for context, q in zip(tested, probs):
        observed = Counter(t[POSITION] for t in samples if tuple(t[:POSITION]) == context)
        f_obs, f_exp = _pooled(observed, q, strata[context])
        if len(f_obs) > 1:
            statistic += float(stats.chisquare(f_obs, f_exp).statistic)
            dof += len(f_obs) - 1
    assert dof >= 2
    pvalue = stats.chi2.sf(statistic, dof)
    assert pvalue > ALPHA, (statistic, dof, pvalue, len(samples), len(strata))


@pytest.mark.real
def test_temperature_fallback_samples_the_same_tokens_with_every_method(base, tiny_en, dev_audio):
    """A window that fails the log-probability check is decoded again, hotter, to the schedule's end;
    the seeded draws make ``specasr`` give AR's tokens there too, and another seed other tokens."""
    from specasr_vllm.config import EngineConfig
    from specasr_vllm.engine import Transcriber

    audio = dev_audio["ls-1089-134686-0000"]
    fails = {"logprob_threshold": 0.0, "temperature_increment_on_fallback": 0.5}  # every decode fails: 0, 0.5, 1.0
    ar = Transcriber(target=base)
    first = ar.transcribe([audio], language="en", **fails)[0]
    assert {s.temperature for s in first.segments} == {1.0}
    assert first.stats.output_tokens > len(first.tokens)  # the statistics count every attempt
    spec = Transcriber(EngineConfig(method="specasr"), target=base, draft=tiny_en)
    assert spec.transcribe([audio], language="en", **fails)[0].tokens == first.tokens
    assert ar.transcribe([audio], language="en", seed=1, **fails)[0].tokens != first.tokens
    greedy = ar.transcribe([audio], language="en")[0]  # the defaults: nothing fails, greedy output
    assert {s.temperature for s in greedy.segments} == {0.0} and greedy.tokens != first.tokens


@pytest.mark.real
def test_silence_yields_no_text(base):
    """openai-whisper's skip: a window likely without speech whose text is not confident is dropped
    (without the skip, greedy decoding of this faint noise says "I'm going to put the oil in the pan.")."""
    from specasr_vllm.engine import Transcriber

    noise = np.random.default_rng(0).normal(0, 0.01, 5 * 16000).astype(np.float32)
    transcriber = Transcriber(target=base)
    windows = []
    assert transcriber.transcribe([noise], language="en", on_window=lambda i, s: windows.append(s))[0].segments == []
    assert windows == [[]]  # one window, decoded once
    assert transcriber.transcribe([np.zeros(100, np.float32)], language="en")[0].duration > 0  # under one frame
    hallucinated = transcriber.transcribe([noise], language="en", no_speech_threshold=None,
                                          temperature_increment_on_fallback=None)[0]
    assert hallucinated.text and hallucinated.segments[0].no_speech_prob > 0.6


def test_fallback_schedules_are_bounded():
    from specasr_vllm.config import DecodeOptions
    from specasr_vllm.errors import InvalidRequestError

    assert DecodeOptions().temperatures() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert DecodeOptions(temperature=0.5).temperatures() == [0.5, 0.7, 0.9]  # as openai-whisper's np.arange
    assert DecodeOptions(temperature_increment_on_fallback=None).temperatures() == [0.0]
    for bad in ({"temperature_increment_on_fallback": 1e-9}, {"temperature": 1.5}, {"temperature": -0.1}):
        with pytest.raises(InvalidRequestError):
            DecodeOptions(**bad)

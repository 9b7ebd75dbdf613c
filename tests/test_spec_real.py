"""Real pair (target whisper-base, draft whisper-tiny.en, different vocabularies), dev files:
``sd`` and ``specasr`` reproduce ``ar`` token for token, German included."""

from __future__ import annotations

import pytest
import torch
from conftest import transcribe_by_language

from specasr_vllm.config import EngineConfig, SpecConfig
from specasr_vllm.engine import Transcriber
from specasr_vllm.errors import InvalidRequestError
from specasr_vllm.speculation.stats import SpecStats

pytestmark = pytest.mark.real


def _run(base, tiny_en, manifest, dev_audio, method: str, **spec):
    """Batches of 8 windows with every row drafting to the end (the engine's default drafts for one row at a time
    only, SpecConfig.max_batch, and a batch whose drafting is slower than AR steps as wide falls back, judged
    together): batched verification must be exact too."""
    config = EngineConfig(method=method, spec=SpecConfig.for_method(method, max_batch=8, fallback_after=10**6, **spec))
    return transcribe_by_language(Transcriber(config, target=base, draft=tiny_en), manifest, dev_audio)


@pytest.mark.parametrize("method,spec", [("sd", {}), ("specasr", {}), ("specasr", {"concurrent_draft": True})],
                         ids=["sd", "specasr", "specasr-concurrent"])
def test_identical_to_ar_on_every_dev_file(base, tiny_en, manifest, dev_audio, base_ar, method, spec):
    if spec.get("concurrent_draft"):
        manifest = manifest[:6]  # the threaded variant on a subset: same code paths, less CI time
    else:  # specasr on every third file, the sd baseline on every twelfth, German always (CI time)
        step = 12 if method == "sd" else 3
        manifest = [e for i, e in enumerate(manifest) if i % step == 0 or e.language != "en"]
    results = _run(base, tiny_en, manifest, dev_audio, method, **spec)
    different = [e.id for e in manifest if results[e.id].tokens != base_ar[e.id].tokens]
    assert not different, different
    english = SpecStats()
    for e in manifest:
        if e.language == "en":
            english.merge(results[e.id].stats)
        else:  # tiny.en cannot serve German: decided before any drafting
            assert results[e.id].stats.fallback == "draft does not serve this language"
            assert results[e.id].stats.drafted_tokens == 0
    assert english.output_tokens == sum(len(base_ar[e.id].tokens) for e in manifest if e.language == "en")
    # the draft really works: most tokens come from accepted drafts, far fewer target passes than tokens
    assert english.accepted_tokens > 0.6 * english.output_tokens
    assert english.target_passes < 0.35 * english.output_tokens
    if method == "specasr":
        assert len(english.acceptance_lengths) > 5  # per-request, per-pass draft lengths vary
        assert english.recycled_accepted > 0


def test_batches_wider_than_max_batch_decode_as_ar(base, tiny_en, manifest, dev_audio, base_ar):
    """SpecConfig.max_batch: three windows decoded together with max_batch 2 take plain AR steps (one pass
    per token, nothing drafted, the draft's encoder never runs) and give AR's tokens."""
    english = [e for e in manifest if e.language == "en"][:3]
    config = EngineConfig(method="specasr", batch_size=3, spec=SpecConfig(max_batch=2))
    transcriber = Transcriber(config, target=base, draft=tiny_en)
    results = transcriber.transcribe([dev_audio[e.id] for e in english], language="en")
    assert [r.tokens for r in results] == [base_ar[e.id].tokens for e in english]
    for r in results:
        assert r.stats.drafted_tokens == 0 and r.stats.draft_steps == 0
        assert r.stats.target_passes == r.stats.output_tokens + 1  # AR: a pass per token, one more for the end
    assert "draft_encode" not in transcriber.totals


def test_bfloat16_encoder_keeps_speculative_output_identical_to_ar(base, tiny_en, manifest, dev_audio, base_ar):
    """``EngineConfig.encoder_dtype``: the target's encoder and cross K/V compute in bfloat16 and its decoder in
    float32 (the caller's model untouched); AR and SpecASR (every row drafting, batched) read the same K/V and
    agree token for token; the K/V move little, so most transcripts stay float32's (63 of 64 English dev files)."""
    english = [e for e in manifest if e.language == "en"][:8]
    audios = [dev_audio[e.id] for e in english]
    spec = SpecConfig.for_method("specasr", max_batch=8, fallback_after=10**6)
    ar, specasr = (Transcriber(EngineConfig(method=method, encoder_dtype="bfloat16", spec=spec if draft else None),
                               target=base, draft=draft) for method, draft in (("ar", None), ("specasr", tiny_en)))
    assert ar.target.model.encoder.module.conv1.weight.dtype == torch.bfloat16
    assert ar.target.model.cross[0][0].module.weight.dtype == torch.bfloat16  # the cross K/V over the audio too
    assert ar.target.model.decoder is base.model.decoder and base.model.encoder.conv1.weight.dtype == torch.float32
    reference = [r.tokens for r in ar.transcribe(audios, language="en")]
    results = specasr.transcribe(audios, language="en")
    assert [r.tokens for r in results] == reference
    assert sum(r.stats.accepted_tokens for r in results) > 0.5 * sum(r.stats.output_tokens for r in results)
    assert sum(tokens == base_ar[e.id].tokens for tokens, e in zip(reference, english)) >= 6
    with pytest.raises(InvalidRequestError, match="encoder_dtype must be one of"):
        Transcriber(EngineConfig(encoder_dtype="int8"), target=base)

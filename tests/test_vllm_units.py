"""The vLLM plugin's parts on hand-made inputs, without starting vLLM: the proposer driven through a
fake model runner (request ids, audio features, sampled ids, finished requests), the suppression hook's
row layout, the guards, the serving directory and the command line."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import VLLM_SETTINGS_FILE, VLLMPluginConfig
from specasr_vllm.errors import UnsupportedVLLMError
from specasr_vllm.vllm_plugin import hooks, launch, proposer, version

pytestmark = pytest.mark.real


def test_first_positions_without_drafts_are_one_row_per_request():
    first = hooks.first_positions(["a", "b", "c"], {"b"}, None, 3)
    assert first.tolist() == [False, True, False]


def test_first_positions_with_drafts_skip_each_requests_draft_rows():
    spec = SimpleNamespace(num_draft_tokens=[2, 0, 3])  # rows: a a a | b | c c c c
    first = hooks.first_positions(["a", "b", "c"], {"b", "c"}, spec, 8)
    assert first.nonzero().flatten().tolist() == [3, 4]


def _runner(base_dir, req_ids, new):
    config = SimpleNamespace(model=str(base_dir), hf_config=SimpleNamespace(model_type="whisper"),
                             get_vocab_size=lambda: 51865)
    return SimpleNamespace(model_config=config, device="cpu", input_batch=SimpleNamespace(req_ids=req_ids),
                           _specasr_new_reqs=new)


def test_sample_hook_applies_whispers_suppression(base, base_dir):
    sample = hooks._wrap_sample(lambda runner, logits, spec: logits)  # the original sampler sees the masked logits
    logits = torch.zeros(2, 51865)
    out = sample(_runner(base_dir, ["new", "old"], {"new"}), logits, None)
    blank, eot = base.begin_suppress_tokens
    assert torch.isinf(out[:, base.suppress_tokens]).all()  # everywhere
    assert torch.isinf(out[0, [blank, eot]]).all() and not torch.isinf(out[1, [blank, eot]]).any()  # first step only
    assert torch.isfinite(out[:, 1000]).all()


def test_sample_hook_leaves_other_models_alone():
    sample = hooks._wrap_sample(lambda runner, logits, spec: logits)
    runner = SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(model_type="llama")),
                             input_batch=SimpleNamespace(req_ids=["a"]), _specasr_new_reqs={"a"})
    logits = torch.zeros(1, 100)
    assert sample(runner, logits, None) is logits


@pytest.mark.parametrize("found,message", [
    (None, "vLLM is not installed; pip install 'specasr-vllm[vllm]'"),
    ("0.31.2", "specasr-vllm supports vLLM <0.33,>=0.32.0, found 0.31.2"),
    ("0.33.0", "specasr-vllm supports vLLM <0.33,>=0.32.0, found 0.33.0"),
])
def test_unsupported_vllm_is_a_clear_error(monkeypatch, found, message):
    monkeypatch.setattr(version, "installed_vllm", lambda: found)
    with pytest.raises(UnsupportedVLLMError, match=message.replace("[", r"\[").replace("]", r"\]")):
        version.check_vllm()


def test_cpu_build_counts_as_its_release(monkeypatch):
    monkeypatch.setattr(version, "installed_vllm", lambda: "0.32.0+cpu")
    assert version.check_vllm() == "0.32.0+cpu"


def test_proposer_guards():
    with pytest.raises(ValueError, match="drafts for Whisper targets; this target is a 'llama' model"):
        proposer._raise_if_not_whisper(SimpleNamespace(hf_config=SimpleNamespace(model_type="llama")))
    with pytest.raises(ValueError, match="reads 80 mel bins but the target's features have 128"):
        proposer._raise_if_mel_mismatch(128, 80, "whisper-tiny.en")


def test_plugin_config_sends_a_chain_and_reads_specasr_json(tmp_path):
    assert VLLMPluginConfig().spec_config().tree is False  # vLLM 0.32 verifies one chain per request
    sd = VLLMPluginConfig(method="sd", spec={"k": 5, "tree": True}).spec_config()
    assert (sd.adaptive, sd.recycling, sd.tree, sd.k) == (False, False, False, 5)
    (tmp_path / VLLM_SETTINGS_FILE).write_text(json.dumps({"draft": "some/dir", "spec": {"max_draft": 12}}))
    loaded = VLLMPluginConfig.load(tmp_path)
    assert (loaded.draft, loaded.method, loaded.spec_config().max_draft) == ("some/dir", "specasr", 12)


def test_audio_frames_finds_where_the_padding_starts(manifest, dev_audio):
    entry = next(e for e in manifest if e.duration < 20)
    frames = proposer.audio_frames(log_mel_spectrogram(dev_audio[entry.id]))
    assert abs(frames - (entry.duration * 100 + 100)) <= 4  # 100 frames a second, plus the margin
    assert proposer.audio_frames(log_mel_spectrogram(np.zeros(16000 * 40, dtype=np.float32))) == 100


def test_serving_dir_links_the_target_and_holds_the_settings(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECASR_CACHE_DIR", str(tmp_path))
    settings = VLLMPluginConfig(draft="whisper-tiny.en", method="sd")
    served = launch.serving_dir(str(base_dir), settings)
    assert launch.serving_dir(str(base_dir), settings) == served  # one directory per settings
    assert launch.serving_dir(str(base_dir), VLLMPluginConfig()) != served
    assert VLLMPluginConfig.load(served) == settings
    assert (served / "model.safetensors").resolve() == (base_dir / "model.safetensors").resolve()
    argv = launch.command(served, "specasr", 24, host="127.0.0.1", port=9000, served_names=["whisper-base", "whisper-1"],
                          extra=["--enforce-eager"])
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "custom_class", "model": "specasr_vllm.vllm_plugin.SpecASRProposer",
                    "num_speculative_tokens": 24}
    assert argv[:3] == ["vllm", "serve", str(served)] and argv[-1] == "--enforce-eager"
    assert "--speculative-config" not in launch.command(served, "ar", 24, host="h", port=1, served_names=["m"])


# ---- the proposer, driven as vLLM's model runner drives it ----------------------------------------------
@pytest.fixture(scope="module")
def fake_vllm(base_dir):
    if version.installed_vllm() is None:
        pytest.skip("vLLM is not installed (.ci/setup installs it)")
    model = SimpleNamespace(model=str(base_dir), max_model_len=448,
                            hf_config=SimpleNamespace(model_type="whisper", vocab_size=51865, num_mel_bins=80))
    return SimpleNamespace(model_config=model, speculative_config=SimpleNamespace(num_speculative_tokens=16),
                           device_config=SimpleNamespace(device="cpu"))


class _Slots:
    """vLLM's per-slot token arrays: prompt, then every token the target has produced."""

    def __init__(self, prompts: list[list[int]]):
        self.tokens = np.zeros((len(prompts), 448), dtype=np.int32)
        self.lengths = np.array([len(p) for p in prompts])
        for row, prompt in enumerate(prompts):
            self.tokens[row, : len(prompt)] = prompt

    def append(self, row: int, tokens: list[int]) -> None:
        self.tokens[row, self.lengths[row] : self.lengths[row] + len(tokens)] = tokens
        self.lengths[row] += len(tokens)


def test_proposer_through_a_fake_runner(fake_vllm, base, manifest, dev_audio, base_ar):
    english, german = next(e for e in manifest if e.language == "en"), next(e for e in manifest if e.language == "de")
    tok = base.tokenizer
    prompts = {"en": tok.prefix("en"), "de": tok.prefix("de")}
    requests = {
        e.language: SimpleNamespace(req_id=e.language, prompt_token_ids=prompts[e.language], mm_features=[
            SimpleNamespace(data={"input_features": SimpleNamespace(data=log_mel_spectrogram(dev_audio[e.id])[None])})])
        for e in (english, german)}
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=["en", "de"]), requests=requests)
    p = proposer.SpecASRProposer(fake_vllm)
    p.settings = dataclasses.replace(p.settings, max_batch=2)  # draft for both slots (the default drafts for one)
    with pytest.raises(RuntimeError, match="needs the specasr_vllm general plugin"):
        p.propose([[1]], np.array([1]), np.zeros((1, 448), dtype=np.int32))
    slots = _Slots([prompts["en"], prompts["de"]])
    reference = {"en": base_ar[english.id].tokens, "de": base_ar[german.id].tokens}
    done = {"en": 0, "de": 0}
    sampled = {}
    for lang, row in (("en", 0), ("de", 1)):  # the prefill's first token
        sampled[lang] = reference[lang][:1]
        slots.append(row, sampled[lang])
        done[lang] = 1
    accepted_total = 0
    for step in range(6):
        p.bind(runner, SimpleNamespace(finished_req_ids=set(), preempted_req_ids=None))
        drafts = p.propose([sampled["en"], sampled["de"]], slots.lengths.copy(), slots.tokens)
        assert drafts[1] == []  # tiny.en does not serve German
        # the target keeps the draft's leading tokens that match its own output, then adds its own token
        ref, at = reference["en"], done["en"]
        keep = 0
        while keep < len(drafts[0]) and at + keep < len(ref) and drafts[0][keep] == ref[at + keep]:
            keep += 1
        accepted_total += keep
        sampled["en"] = ref[at : at + keep + 1]
        sampled["de"] = reference["de"][done["de"] : done["de"] + 1]
        for lang, row in (("en", 0), ("de", 1)):
            slots.append(row, sampled[lang])
            done[lang] += len(sampled[lang])
    p.bind(runner, SimpleNamespace(finished_req_ids=set(), preempted_req_ids=None))
    p.propose([sampled["en"], sampled["de"]], slots.lengths.copy(), slots.tokens)  # delivers the last acceptance
    p.bind(runner, SimpleNamespace(finished_req_ids={"en"}, preempted_req_ids=None))
    runner.input_batch.req_ids = ["de"]
    assert p.propose([sampled["de"]], slots.lengths[1:].copy(), slots.tokens[1:]) == [[]]
    stats = p.stats()
    assert stats["accepted_tokens"] == accepted_total > 5  # the feedback counted what the "target" kept
    assert stats["fallbacks"] == {"draft does not serve this language": 1}
    assert "en" not in p.drafter.requests and "en" not in p._prompt_len  # the finished request is forgotten
    assert stats["steps"] == 8 and 5 <= stats["drafting_steps"] <= 7 and stats["ms_per_drafting_step"] > 0

"""Device hygiene: every tensor of the decoding loops is created on the device it is used on.

The loops run with the models on the CPU while ``meta`` is the default device of tensor factories:
a tensor created without an explicit device lands on ``meta`` and the first operation mixing it with
a CPU tensor fails (on a GPU the same slip is a cuda/cpu mismatch, or a silent host round trip).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_random_hf_dir

from specasr_vllm.config import SpecConfig
from specasr_vllm.engine.ar import decode_ar
from specasr_vllm.engine.speculative import decode_speculative
from specasr_vllm.models.compiled import CompiledWhisper
from specasr_vllm.models.registry import load_model
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.speculation import Drafter
from specasr_vllm.speculation.bridge import make_bridge
from specasr_vllm.speculation.draft_model import DraftModel

MAX_POSITIONS = 30


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_dir):
    target = load_model(str(make_random_hf_dir(tmp_path_factory.mktemp("t"), base_dir, seed=1)))
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return target, draft


def _decode_all(target, drafter, mel, method: str, timestamps: bool) -> list[list[int]]:
    rules = WhisperRules(target)
    features = target.model.encode(mel)
    prefixes = [target.tokenizer.prefix(lang, timestamps=timestamps) for lang in ("en", "de")]
    if method == "ar":
        outputs = decode_ar(target, rules, features, prefixes, MAX_POSITIONS, timestamps)
        return [o.tokens for o in outputs]
    for key, lang, m in zip("ab", ("en", "de"), mel):
        drafter.start(key, lang, "transcribe", timestamps, mel=m)
    outputs = decode_speculative(target, rules, drafter, features, prefixes, list("ab"), MAX_POSITIONS,
                                 timestamps=timestamps)
    stats = drafter.release(list("ab"))
    assert sum(s.drafted_tokens for s in stats.values()) > 0  # the drafting path really ran
    return [o.tokens for o in outputs]


@pytest.mark.parametrize("method,timestamps,graphs", [("ar", False, False), ("sd", False, False),
                                                      ("specasr", False, False), ("specasr", True, False),
                                                      ("ar", False, True), ("specasr", True, True)])
def test_decoding_creates_no_tensor_off_the_model_device(models, method, timestamps, graphs):
    """``graphs``: the GPU's path (target and draft steps through ``StepGraphs``), run uncaptured."""
    target, draft = models
    torch.manual_seed(0)
    mel = torch.randn(2, 80, 3000)
    # loading and quantising models is set-up, not the loop: the drafter is built before the switch
    config = SpecConfig.for_method(method, fallback_after=10**6, tree_threshold=0.99, draft_vocab=None,
                                   tree=method == "specasr")
    if graphs:
        target = dataclasses.replace(target, model=CompiledWhisper(target.model, graphs=True))
        drafter = Drafter(DraftModel(draft, config, graphs=True), make_bridge(target.tokenizer, draft.tokenizer),
                          config, target.tokenizer.eot, target.tokenizer.timestamp_begin)
    else:
        drafter = Drafter.build(draft, target.tokenizer, config)
    reference = _decode_all(target, drafter, mel, method, timestamps)  # default device: cpu
    torch.set_default_device("meta")
    try:
        assert torch.empty(1).device.type == "meta"
        hygienic = _decode_all(target, drafter, mel, method, timestamps)
    finally:
        torch.set_default_device(None)
    assert hygienic == reference
    if graphs:
        assert target.model.eager_calls == 0 and target.model.graphs.calls > 0
        assert method == "ar" or drafter.draft.graphs.calls > 0

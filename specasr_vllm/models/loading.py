"""Load a Hugging Face-format Whisper directory (config.json + model.safetensors) into the lean model.

Only safetensors are read: a pickle checkpoint can run code on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from specasr_vllm.errors import UnknownModelError
from specasr_vllm.models.whisper import Whisper, WhisperDims

_IGNORED = {"proj_out.weight"}  # tied to the token embedding


def load_whisper(model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Whisper:
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise UnknownModelError(f"{model_dir}: no model.safetensors (only safetensors checkpoints are loaded)")
    dims = WhisperDims.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    state = {k.removeprefix("model."): v for k, v in load_file(str(weights)).items() if k not in _IGNORED}
    with torch.device("meta"):
        model = Whisper(dims)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()

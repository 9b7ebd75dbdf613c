"""Read CTranslate2 (faster-whisper) Whisper models and convert them to Hugging Face format.

The binary layout and the name mapping are documented in ``shared/notes/ct2-whisper-format.md``;
this module is the executable form of that note. Only what Whisper needs is supported: float
tensors (float32/float16/bfloat16, or int8 with per-row scales, dequantised on read).
"""

from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from specasr_vllm.config import HOP_LENGTH, MAX_TARGET_POSITIONS, N_FFT, N_FRAMES, N_SAMPLES, SAMPLE_RATE
from specasr_vllm.errors import UnknownModelError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_SUPPORTED_BINARY_VERSION = 6


@dataclass
class CT2Model:
    """The variables of one ``model.bin``: tensors by name, plus the alias table."""

    spec_name: str
    variables: dict[str, np.ndarray] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


def _read_str(f: io.BufferedIOBase) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n)[:-1].decode("utf-8")  # the length counts a trailing NUL


def read_ct2_model(parts: list[Path]) -> CT2Model:
    """Parse ``model.bin`` given as one or more byte-split parts (concatenated in order)."""
    f = io.BytesIO(b"".join(p.read_bytes() for p in parts))
    try:
        (version,) = struct.unpack("<I", f.read(4))
        if version != _SUPPORTED_BINARY_VERSION:
            raise UnknownModelError(
                f"CTranslate2 model.bin binary version {version} is not supported (expected {_SUPPORTED_BINARY_VERSION})"
            )
        model = CT2Model(spec_name=_read_str(f))
        f.read(4)  # spec revision
        (num_vars,) = struct.unpack("<I", f.read(4))
        for _ in range(num_vars):
            name = _read_str(f)
            (rank,) = struct.unpack("<B", f.read(1))
            shape = struct.unpack(f"<{rank}I", f.read(4 * rank))
            dtype_id, num_bytes = struct.unpack("<BI", f.read(5))
            data = f.read(num_bytes)
            if len(data) != num_bytes:
                raise UnknownModelError(f"CTranslate2 model.bin is truncated inside variable {name!r}")
            model.variables[name] = _to_array(data, dtype_id, shape)
        (num_aliases,) = struct.unpack("<I", f.read(4))
        for _ in range(num_aliases):
            alias = _read_str(f)
            model.aliases[alias] = _read_str(f)
    except struct.error as exc:
        raise UnknownModelError(f"CTranslate2 model.bin is truncated or corrupt ({exc})") from exc
    _dequantize_int8(model)
    return model


def _to_array(data: bytes, dtype_id: int, shape: tuple[int, ...]) -> np.ndarray:
    dtype = _DTYPES.get(dtype_id)
    if dtype is None:
        raise UnknownModelError(f"unknown CTranslate2 dtype id {dtype_id}")
    if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 bits into float32's top half
        raw = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _dequantize_int8(model: CT2Model) -> None:
    """int8 weights come with float32 ``<weight>_scale`` per output row: w = q / scale."""
    for name in [n for n in model.variables if n.endswith("_scale")]:
        weight_name = name[: -len("_scale")]
        q = model.variables.get(weight_name)
        if q is not None and q.dtype == np.int8:
            scale = model.variables.pop(name).astype(np.float32)
            model.variables[weight_name] = q.astype(np.float32) / scale.reshape(-1, *([1] * (q.ndim - 1)))


def _num_layers(model: CT2Model, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")  # not a bare "layer_" prefix: {stack}/layer_norm exists
    return 1 + max(int(m.group(1)) for n in model.variables if (m := pattern.match(n)))


def hf_state_dict(model: CT2Model) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` names."""
    out: dict[str, np.ndarray] = {}
    d = model.get("encoder/conv1/weight").shape[0]

    def ln(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = model.get(f"{src}/gamma")
        out[f"{dst}.bias"] = model.get(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = model.get(f"{src}/weight")
        out[f"{dst}.bias"] = model.get(f"{src}/bias")

    def fused(src: str, dsts: list[str]) -> None:
        w, b = model.get(f"{src}/weight"), model.get(f"{src}/bias")
        for i, dst in enumerate(dsts):
            out[f"{dst}.weight"] = w[i * d : (i + 1) * d]
            if not dst.endswith("k_proj"):  # Whisper's key projections have no bias (CT2 stores zeros)
                out[f"{dst}.bias"] = b[i * d : (i + 1) * d]

    def self_attention(src: str, dst: str) -> None:
        ln(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")

    def ffn(src: str, dst: str) -> None:
        ln(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")

    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    out["model.encoder.embed_positions.weight"] = model.get("encoder/position_encodings/encodings")
    for i in range(_num_layers(model, "encoder")):
        self_attention(f"encoder/layer_{i}", f"model.encoder.layers.{i}")
        ffn(f"encoder/layer_{i}", f"model.encoder.layers.{i}")
    ln("encoder/layer_norm", "model.encoder.layer_norm")

    out["model.decoder.embed_tokens.weight"] = model.get("decoder/embeddings/weight")
    out["model.decoder.embed_positions.weight"] = model.get("decoder/position_encodings/encodings")
    for i in range(_num_layers(model, "decoder")):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        self_attention(src, dst)
        ln(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"])
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        ffn(src, dst)
    ln("decoder/layer_norm", "model.decoder.layer_norm")
    return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}  # copy: frombuffer is read-only


def _special_ids(tokenizer: dict) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer["added_tokens"]}


def _with_timestamp_tokens(tokenizer: dict, vocab_size: int) -> dict:
    """Append ``<|0.00|>`` ... ``<|30.00|>`` where the shipped tokenizer.json lacks them (tiny.en's does)."""
    specials = _special_ids(tokenizer)
    if "<|0.00|>" in specials:
        return tokenizer
    first = specials["<|notimestamps|>"] + 1
    for i in range(vocab_size - first):
        tokenizer["added_tokens"].append(
            {"id": first + i, "content": f"<|{i * 0.02:.2f}|>", "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": True, "special": False}
        )
    return tokenizer


def hf_configs(model: CT2Model, ct2_config: dict, tokenizer: dict) -> tuple[dict, dict, dict]:
    """Build ``config.json``, ``generation_config.json`` and ``preprocessor_config.json``.

    CTranslate2's config has no dimensions, so they come from tensor shapes and ``*/num_heads``.
    """
    specials = _special_ids(tokenizer)
    embed = model.get("decoder/embeddings/weight")
    vocab_size, d_model = embed.shape
    n_mels = model.get("encoder/conv1/weight").shape[1]
    eot, sot = specials["<|endoftext|>"], specials["<|startoftranscript|>"]
    multilingual = vocab_size >= 51865
    config = {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": int(vocab_size),
        "num_mel_bins": int(n_mels),
        "d_model": int(d_model),
        "encoder_layers": _num_layers(model, "encoder"),
        "decoder_layers": _num_layers(model, "decoder"),
        "encoder_attention_heads": int(model.get("encoder/num_heads")),
        "decoder_attention_heads": int(model.get("decoder/num_heads")),
        "encoder_ffn_dim": int(model.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        "decoder_ffn_dim": int(model.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        "max_source_positions": int(model.get("encoder/position_encodings/encodings").shape[0]),
        "max_target_positions": int(model.get("decoder/position_encodings/encodings").shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "pad_token_id": eot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "decoder_start_token_id": sot,
        "suppress_tokens": list(ct2_config["suppress_ids"]),
        "begin_suppress_tokens": list(ct2_config["suppress_ids_begin"]),
    }
    languages = {c: i for c, i in specials.items() if re.fullmatch(r"<\|[a-z]{2,3}\|>", c) and i > sot}
    generation = {
        "alignment_heads": ct2_config.get("alignment_heads", []),
        "begin_suppress_tokens": config["begin_suppress_tokens"],
        "suppress_tokens": config["suppress_tokens"],
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "decoder_start_token_id": sot,
        "max_length": MAX_TARGET_POSITIONS,
        "is_multilingual": multilingual,
        "no_timestamps_token_id": specials["<|notimestamps|>"],
        "prev_sot_token_id": specials["<|startofprev|>"],
    }
    if multilingual:  # English-only models must not have these: transformers would "detect" a language
        generation["lang_to_id"] = languages
        generation["task_to_id"] = {"transcribe": specials["<|transcribe|>"], "translate": specials["<|translate|>"]}
    preprocessor = {
        "feature_extractor_type": "WhisperFeatureExtractor",
        "feature_size": int(n_mels),
        "sampling_rate": SAMPLE_RATE,
        "hop_length": HOP_LENGTH,
        "n_fft": N_FFT,
        "chunk_length": N_SAMPLES // SAMPLE_RATE,
        "n_samples": N_SAMPLES,
        "nb_max_frames": N_FRAMES,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": False,
    }
    return config, generation, preprocessor


def convert_ct2_to_hf(parts: list[Path], ct2_config_path: Path, tokenizer_path: Path, out_dir: Path) -> None:
    """Write a Hugging Face Whisper directory (safetensors, configs, tokenizer.json) into ``out_dir``.

    Tensors keep the dtype CTranslate2 stored (fp16 for every shipped model); loaders upcast.
    """
    model = read_ct2_model(parts)
    if model.spec_name != "WhisperSpec":
        raise UnknownModelError(f"{parts[0]} holds a {model.spec_name}, not a Whisper model")
    ct2_config = json.loads(ct2_config_path.read_text())
    tokenizer = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    config, generation, preprocessor = hf_configs(model, ct2_config, tokenizer)
    tokenizer = _with_timestamp_tokens(tokenizer, config["vocab_size"])
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for name, payload in [("config.json", config), ("generation_config.json", generation),
                          ("preprocessor_config.json", preprocessor)]:
        (out_dir / name).write_text(json.dumps(payload, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")

"""CTranslate2 model.bin reading and conversion to Hugging Face format."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration

from specasr_vllm.errors import UnknownModelError
from specasr_vllm.models.ct2 import read_ct2_model


def _str(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def write_model_bin(variables: dict[str, tuple[int, np.ndarray]], aliases: dict[str, str]) -> bytes:
    """Serialise ``{name: (dtype_id, array)}`` in CTranslate2's binary version 6 layout."""
    out = struct.pack("<I", 6) + _str("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, (dtype_id, arr) in variables.items():
        data = arr.tobytes()
        out += _str(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        out += struct.pack("<BI", dtype_id, len(data)) + data
    out += struct.pack("<I", len(aliases))
    for a, t in aliases.items():
        out += _str(a) + _str(t)
    return out


@pytest.fixture
def handmade():
    rng = np.random.default_rng(0)
    w16 = rng.normal(size=(4, 3)).astype(np.float16)
    w32 = rng.normal(size=(5,)).astype(np.float32)
    q = np.array([[10, -20], [30, 40]], dtype=np.int8)
    scale = np.array([2.0, 4.0], dtype=np.float32)
    bf = np.array([1.5, -2.25], dtype=np.float32)
    bf16_bits = (bf.view(np.uint32) >> 16).astype(np.uint16)
    variables = {
        "decoder/embeddings/weight": (4, w16),
        "decoder/layer_norm/gamma": (0, w32),
        "encoder/linear/weight": (1, q),
        "encoder/linear/weight_scale": (0, scale),
        "encoder/bf": (5, bf16_bits),
        "encoder/num_heads": (3, np.array(8, dtype=np.int32)),
    }
    data = write_model_bin(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    return data, w16, w32, q, scale, bf


def test_reads_every_dtype_alias_and_scalar(tmp_path, handmade):
    data, w16, w32, q, scale, bf = handmade
    (tmp_path / "model.bin").write_bytes(data)
    m = read_ct2_model([tmp_path / "model.bin"])
    assert m.spec_name == "WhisperSpec"
    assert np.array_equal(m.get("decoder/projection/weight"), w16)
    assert np.array_equal(m.get("decoder/layer_norm/gamma"), w32)
    assert np.allclose(m.get("encoder/linear/weight"), q / scale[:, None])  # int8 dequantised
    assert "encoder/linear/weight_scale" not in m.variables
    assert np.array_equal(m.get("encoder/bf"), bf)
    assert int(m.get("encoder/num_heads")) == 8


def test_split_parts_concatenate(tmp_path, handmade):
    data = handmade[0]
    for cut in (1, 17, len(data) // 2, len(data) - 1):
        (tmp_path / "a").write_bytes(data[:cut])
        (tmp_path / "b").write_bytes(data[cut:])
        assert np.array_equal(read_ct2_model([tmp_path / "a", tmp_path / "b"]).get("decoder/embeddings/weight"), handmade[1])


def test_truncated_file_is_a_clear_error(tmp_path, handmade):
    (tmp_path / "model.bin").write_bytes(handmade[0][:60])
    with pytest.raises(UnknownModelError, match="truncated"):
        read_ct2_model([tmp_path / "model.bin"])


def test_wrong_binary_version(tmp_path, handmade):
    (tmp_path / "model.bin").write_bytes(struct.pack("<I", 5) + handmade[0][4:])
    with pytest.raises(UnknownModelError, match="binary version 5"):
        read_ct2_model([tmp_path / "model.bin"])


@pytest.mark.parametrize("name,params,layers,d_model,vocab",
                         [("base_dir", 72_593_920, 6, 512, 51865), ("tiny_en_dir", 37_760_256, 4, 384, 51864)])
def test_converted_real_models_load_strictly_in_transformers(request, name, params, layers, d_model, vocab):
    directory = request.getfixturevalue(name)
    config = json.loads((directory / "config.json").read_text())
    assert (config["encoder_layers"], config["d_model"], config["vocab_size"]) == (layers, d_model, vocab)
    model, info = WhisperForConditionalGeneration.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert sum(p.numel() for p in model.parameters()) == params
    # Whisper's key projections have no bias; the rest do and are not all zero
    assert model.model.encoder.layers[0].self_attn.k_proj.bias is None
    assert model.model.decoder.layers[0].encoder_attn.v_proj.bias.abs().sum() > 0


def test_timestamp_tokens_are_completed(tiny_en_dir, base_dir):
    for directory, first in [(tiny_en_dir, 50363), (base_dir, 50364)]:
        added = {t["content"]: t["id"] for t in json.loads((directory / "tokenizer.json").read_text())["added_tokens"]}
        assert added["<|0.00|>"] == first and added["<|30.00|>"] == first + 1500

"""Where and why a method's output leaves AR's: the first differing token and the target's logits there.

    python -m benchmarks.identity_probe --method sd --device cuda --dtype float16 [--audio F.npz]

For each file whose tokens differ from AR's, it re-scores AR's own tokens two ways up to the first
difference: one token per decoder call (AR's path) and the last ``--width`` tokens in one call (a
verification pass), and prints each path's two best tokens and logits there. A top-2 gap below the
two paths' logit difference means the files differ by rounding (multi-token kernels sum in another
order), not by a bug in the speculation.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.gpu_check import load_audio
from specasr_vllm.audio import log_mel_spectrogram
from specasr_vllm.config import DEFAULT_DRAFT, DEFAULT_MODEL, EngineConfig, SpecConfig, default_manifest
from specasr_vllm.engine import Transcriber
from specasr_vllm.models.registry import load_model


def rescore(model, mel: torch.Tensor, prefix: list[int], tokens: list[int], at: int, width: int) -> dict:
    """Logits at output position ``at`` after AR's tokens, by single steps and by one ``width``-token pass."""
    dev = model.device
    features = model.encode(mel[None])
    single = model.new_cache(features)
    logits = model.decode(torch.tensor([prefix], device=dev), single)[0, -1]
    for tok in tokens[:at]:
        logits = model.decode(torch.tensor([[tok]], device=dev), single)[0, -1]
    split = max(0, at - width + 1)
    wide = model.new_cache(features)
    model.decode(torch.tensor([prefix + tokens[:split]], device=dev), wide)
    chunk = [prefix[-1]] if split == 0 else []
    if split == 0:
        wide.set_length(0, len(prefix) - 1)
    many = model.decode(torch.tensor([chunk + tokens[split:at]], device=dev), wide)[0, -1]
    top = {name: [(int(i), float(v)) for v, i in zip(*x.float().topk(2))] for name, x in (("single", logits),
                                                                                           ("wide", many))}
    return {**top, "max_abs_diff": float((logits.float() - many.float()).abs().max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--draft", default=DEFAULT_DRAFT)
    p.add_argument("--method", default="sd")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--width", type=int, default=9, help="tokens in the re-scoring pass (sd verifies k + 1)")
    p.add_argument("--manifest", default=str(default_manifest()))
    p.add_argument("--max-duration", type=float, default=30.0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--audio", default=None)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    target, draft = load_model(args.model, args.device, dtype), load_model(args.draft, args.device, dtype)
    engines = {m: Transcriber(EngineConfig(method=m, device=args.device, dtype=args.dtype, batch_size=1,
                                           spec=SpecConfig.for_method(m)), target=target,
                              draft=draft if m != "ar" else None) for m in ("ar", args.method)}
    differing = 0
    for name, audio in load_audio(args):
        ar, other = (engines[m].transcribe([audio], language="en")[0].tokens for m in ("ar", args.method))
        if ar == other:
            continue
        differing += 1
        at = next(i for i, (a, b) in enumerate(zip(ar + [-1], other + [-1])) if a != b)
        mel = log_mel_spectrogram(audio, target.n_mels)
        report = rescore(target.model, mel, target.tokenizer.prefix("en"), ar, at, args.width)
        print(f"{name}: first difference at token {at} (ar {ar[at] if at < len(ar) else 'end'}, "
              f"{args.method} {other[at] if at < len(other) else 'end'}): {report}")
    print(f"{differing} files differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

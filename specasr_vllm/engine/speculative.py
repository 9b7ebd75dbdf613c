"""Speculative decoding on the target: prefill, then one verification pass per draft tree.

The whole loop on one screen: the target's prefill yields each row's first token; then, until every
row ends, the drafter proposes a tree per row, the target scores every row's tree in one batched
forward (tree attention mask), the greedy acceptance rule keeps the longest matching path plus the
target's own next token, and the target's cache keeps exactly that path. Output is token-identical
to ``decode_ar``, greedy or sampled with the same seeds: the target's choice at a tree node is the
token AR would pick there, noise included (``models/sampling.py``). Once no row of the batch drafts any more
(each declined or fell back), the rest is ``decode_ar``'s own steps (``ar_steps``): no more calls into the
drafter per token, and AR's pick instead of the verifier's rules.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import torch

from specasr_vllm.config import MAX_TARGET_POSITIONS
from specasr_vllm.engine.ar import ar_steps
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.engine.rows import BatchRows
from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.models.sampling import Sampling
from specasr_vllm.speculation import Drafter, DraftTree, accept_greedy, pack_rows


@torch.no_grad()
def decode_speculative(
    asr: ASRModel, rules: WhisperRules, drafter: Drafter, audio_features: torch.Tensor,
    prefixes: list[list[int]], keys: list[Hashable], max_positions: int = MAX_TARGET_POSITIONS,
    pool: ThreadPoolExecutor | None = None, timestamps: bool = False, cache: DecoderCache | None = None,
    sampling: Sampling | None = None,
) -> list[Decoded]:
    """``keys`` are the rows' requests, already started with ``drafter``; ``pool`` (one worker) lets
    the drafter run ahead during each target pass, one core each; ``cache`` as in ``decode_ar``.

    With ``timestamps`` the rules see, at every tree node, the tokens on the path to it. ``sampling``
    as in ``decode_ar``: verification input ``j`` of a row that has generated ``L`` tokens predicts
    position ``L + depth(j)`` and takes that position's noise, so AR and speculation agree per seed.
    """
    model = asr.model
    if sampling is not None and len(sampling.seeds) != len(prefixes):
        raise ValueError(f"{len(sampling.seeds)} sampling seeds for {len(prefixes)} rows")
    limit = [max_positions - len(p) for p in prefixes]  # tokens each row may emit
    with BatchRows(model, audio_features, cache) as batch:
        prefill = model.decode(torch.tensor(prefixes, device=model.device), batch.cache, batch.rows)
        outputs = [Decoded(no_speech_prob=p) for p in rules.no_speech_prob(prefill, prefixes[0])]
        noise = None if sampling is None else sampling.noise(
            list(range(len(prefixes))), [0] * len(prefixes), prefill.shape[-1], prefill.device)
        first, logprobs = rules.pick(prefill[:, -1], True, [[] for _ in prefixes] if timestamps else None, noise)
        for out, tok, logprob in zip(outputs, first, logprobs):
            out.extend([tok], [logprob], rules.eot)
            out.passes += 1
        drafter.feedback({key: [tok] for key, tok in zip(keys, first)})
        last = first  # each row's newest token: emitted, not yet in the target's cache
        _keep_unfinished(batch, drafter, keys, outputs, last, limit, rules.eot)
        while batch.active:
            active = batch.active
            if not any(drafter.drafting(keys[i]) for i in active):  # every row runs as AR now: at AR's cost
                ar_steps(asr, rules, batch, outputs, limit, timestamps, sampling,
                         emitted=lambda tokens, seconds: drafter.feedback({keys[i]: [t] for i, t in tokens.items()},
                                                                          pass_seconds=seconds))
                break
            began = time.perf_counter()  # the whole pass, for the drafter's judgement of whether drafting pays
            trees = drafter.propose({keys[i]: outputs[i].tokens for i in active},
                                    {keys[i]: limit[i] - len(outputs[i].tokens) - 1 for i in active})
            tree_rows = [trees[keys[i]].verification_row(last[i]) for i in active]
            packed = pack_rows(tree_rows, rules.eot, model.device)
            n = packed.tokens.shape[1]
            starts = batch.cache.lengths(batch.rows)
            stop = threading.Event()
            ahead = pool.submit(drafter.run_ahead, stop) if pool is not None else None
            t0 = time.perf_counter()
            logits = model.decode(packed.tokens, batch.cache, batch.rows, packed.mask, packed.depths).flatten(0, 1)
            contexts = [ctx for i in active for ctx in _node_contexts(outputs[i].tokens, trees[keys[i]], n)] \
                if timestamps else None
            noise = None if sampling is None else sampling.noise(
                [i for i in active for _ in range(n)],  # padding inputs: depth 0, their choice is never read
                [len(outputs[i].tokens) + d for i, row in zip(active, tree_rows) for d in _padded(row.depths, n)],
                logits.shape[-1], logits.device)
            masked, choices = rules.choose(logits, False, contexts, noise)
            seconds = time.perf_counter() - t0
            if ahead is not None:
                stop.set()
                ahead.result()
            emitted, kept = {}, []
            for pos, i in enumerate(active):
                tree = trees[keys[i]]
                acc = accept_greedy(tree, choices[pos * n : (pos + 1) * n], rules.eot)
                inputs_kept = [0] + [node + 1 for node in acc.nodes]  # the root's input, then each accepted node's
                batch.cache.keep(batch.rows[pos], starts[pos], inputs_kept)
                new = acc.tokens(tree)[: limit[i] - len(outputs[i].tokens)]
                kept.append([pos * n + j for j in inputs_kept[: len(new)]])
                emitted[keys[i]] = new
            # log-probabilities of the emitted tokens only: each at the input that chose it
            inputs = [j for row_inputs in kept for j in row_inputs]
            logprobs = iter(rules.logprobs(masked, inputs, [choices[j] for j in inputs]))
            for i, row_inputs in zip(active, kept):
                new = emitted[keys[i]]
                outputs[i].extend(new, [next(logprobs) for _ in row_inputs], rules.eot)
                outputs[i].passes += 1
                last[i] = new[-1]
            drafter.feedback(emitted, seconds, time.perf_counter() - began)
            _keep_unfinished(batch, drafter, keys, outputs, last, limit, rules.eot)
    return outputs


def _keep_unfinished(batch: BatchRows, drafter: Drafter, keys: list[Hashable], outputs: list[Decoded],
                     last: list[int], limit: list[int], eot: int) -> None:
    """Drop rows that emitted end-of-text or reached their position limit, from the batch and the drafter."""
    done = [p for p, i in enumerate(batch.active) if last[i] == eot or len(outputs[i].tokens) >= limit[i]]
    if done:
        drafter.finish([keys[batch.active[p]] for p in done])
        batch.keep([p for p in range(len(batch.active)) if p not in done])


def _node_contexts(generated: list[int], tree: DraftTree, n: int) -> list[list[int]]:
    """The tokens before each of the ``n`` verification inputs (root, nodes, padding) of one row."""
    paths = [[]] + [[tree.tokens[node] for node in tree.path_to(i)] for i in range(len(tree))]
    return [generated + path for path in paths] + [generated] * (n - len(paths))


def _padded(depths: list[int], n: int) -> list[int]:
    """A row's input depths padded to the pass's ``n`` inputs, as ``pack_rows`` pads them."""
    return depths + [0] * (n - len(depths))

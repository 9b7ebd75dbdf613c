"""Speculative decoding on the target: prefill, then one verification pass per draft tree.

The whole loop on one screen: the target's prefill yields each row's first token; then, until every
row ends, the drafter proposes a tree per row, the target scores every row's tree in one batched
forward (tree attention mask), the greedy acceptance rule keeps the longest matching path plus the
target's own next token, and the target's cache keeps exactly that path. Output is token-identical
to ``decode_ar``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import torch

from specasr_vllm.config import MAX_TARGET_POSITIONS
from specasr_vllm.engine.decoded import Decoded
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.rules import WhisperRules
from specasr_vllm.speculation.acceptance import accept_greedy
from specasr_vllm.speculation.drafter import Drafter
from specasr_vllm.speculation.tree import DraftTree


@torch.no_grad()
def decode_speculative(
    asr: ASRModel, rules: WhisperRules, drafter: Drafter, audio_features: torch.Tensor,
    prefixes: list[list[int]], keys: list[Hashable], max_positions: int = MAX_TARGET_POSITIONS,
    pool: ThreadPoolExecutor | None = None, timestamps: bool = False,
) -> list[Decoded]:
    """``pool`` (one worker) lets the drafter run ahead during each target pass, one core each.

    With ``timestamps`` the rules see, at every tree node, the tokens on the path to it.
    """
    model = asr.model
    cache = model.new_cache(audio_features)
    limit = [max_positions - len(p) for p in prefixes]  # tokens each row may emit
    prefill = model.decode(torch.tensor(prefixes), cache)
    outputs = [Decoded(no_speech_prob=p) for p in rules.no_speech_prob(prefill, prefixes[0])]
    first, logprobs = rules.pick(prefill[:, -1], True, [[] for _ in prefixes] if timestamps else None)
    for out, tok, logprob in zip(outputs, first, logprobs):
        out.extend([tok], [logprob], rules.eot)
    last = first  # each row's newest token: emitted, not yet in the target's cache
    active = [i for i, t in enumerate(first) if t != rules.eot and limit[i] > 1]
    cache = cache.select(active)
    while active:
        trees = drafter.propose({keys[i]: outputs[i].tokens for i in active},
                                {keys[i]: limit[i] - len(outputs[i].tokens) - 1 for i in active})
        inputs = [trees[keys[i]].verification_inputs(last[i]) for i in active]
        n = max(len(toks) for toks, _, _ in inputs)
        tokens = torch.full((len(active), n), rules.eot, dtype=torch.long)
        mask = torch.eye(n, dtype=torch.bool).repeat(len(active), 1, 1)  # padding sees only itself
        depths = torch.zeros(len(active), n, dtype=torch.long)
        for row, (toks, m, d) in enumerate(inputs):
            tokens[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks), : len(toks)] = m
            depths[row, : len(d)] = torch.tensor(d)
        starts = cache.lengths.clone()
        stop = threading.Event()
        ahead = pool.submit(drafter.run_ahead, stop) if pool is not None else None
        t0 = time.perf_counter()
        logits = model.decode(tokens, cache, mask, depths).flatten(0, 1)
        contexts = [ctx for i in active for ctx in _node_contexts(outputs[i].tokens, trees[keys[i]], n)] \
            if timestamps else None
        choices, logprobs = rules.pick(logits, False, contexts)
        drafter.costs.observe(verify=time.perf_counter() - t0)
        if ahead is not None:
            stop.set()
            ahead.result()
        still = []
        for row, i in enumerate(active):
            tree = trees[keys[i]]
            choice, logprob = choices[row * n : (row + 1) * n], logprobs[row * n : (row + 1) * n]
            acc = accept_greedy(tree, choice, rules.eot)
            drafter.observe(keys[i], tree, acc)
            stats = drafter.stats(keys[i])
            stats.target_passes += 1
            cache.keep(row, int(starts[row]), [0] + [node + 1 for node in acc.nodes])
            room = limit[i] - len(outputs[i].tokens)
            new = acc.tokens(tree)[:room]
            outputs[i].extend(new, [logprob[0]] + [logprob[node + 1] for node in acc.nodes], rules.eot)
            last[i] = new[-1]
            if rules.eot not in new and len(outputs[i].tokens) < limit[i]:
                still.append(row)
        if len(still) < len(active):
            drafter.release([keys[active[row]] for row in range(len(active)) if row not in still])
            cache = cache.select(still)
            active = [active[row] for row in still]
    for i, out in enumerate(outputs):
        drafter.stats(keys[i]).output_tokens += len(out.tokens)
    return outputs


def _node_contexts(generated: list[int], tree: DraftTree, n: int) -> list[list[int]]:
    """The tokens before each of the ``n`` verification inputs (root, nodes, padding) of one row."""
    paths = [[]] + [[tree.tokens[node] for node in tree.path_to(i)] for i in range(len(tree))]
    return [generated + path for path in paths] + [generated] * (n - len(paths))

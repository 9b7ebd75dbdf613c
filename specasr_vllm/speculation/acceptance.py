"""The acceptance rule, in one place: which drafted tokens the target keeps after one pass.

Starting at the root, follow the child whose token equals the target's own choice at the current
node; stop at the first node with no such child. The target's choice there is the bonus token, so
every pass yields at least one token and the output is exactly what the target would produce alone.

The same walk is the acceptance rule at any temperature. With sampling (``models/sampling.py``) the
target's choice at a node that predicts generated position ``p`` is the Gumbel-max draw
``argmax(l/T + g_p)``, with noise ``g_p`` keyed by (seed, ``p``) and independent of everything the
draft saw. For a drafted token ``x`` there:

- ``x`` is accepted exactly when the draw equals it, with probability ``q(x)``, ``q = softmax(l/T)``;
- on rejection the emitted token is the draw conditioned on differing from ``x``: ``q`` with ``x``
  removed and renormalised, ``q(y) / (1 - q(x))``;

which is speculative sampling's lossless rejection rule for a deterministic (greedy) draft, where
``min(1, q(x)/p_draft(x))`` with ``p_draft(x) = 1`` is ``q(x)`` and the residual ``max(0, q - p_draft)``
is ``q`` without ``x``. Branches of a tree are siblings tried against the same draw, so at most one
matches and the rule stays exact. And because the noise belongs to the position, not to the pass,
speculative output equals autoregressive output token for token for the same seed.

A host that samples on its own (vLLM's rejection sampler) reports the tokens it emitted instead;
``accepted_path`` turns them back into the tree's nodes, for any tree.
"""

from __future__ import annotations

from dataclasses import dataclass

from specasr_vllm.speculation.tree import ROOT, DraftTree


@dataclass
class Acceptance:
    nodes: list[int]  # accepted node indices, root to leaf
    bonus: int  # the target's token after the last accepted node

    def tokens(self, tree: DraftTree) -> list[int]:
        return [tree.tokens[i] for i in self.nodes] + [self.bonus]


def accept_greedy(tree: DraftTree, target_choice: list[int], eot: int) -> Acceptance:
    """``target_choice[i]`` is the target's token (greedy or sampled) after verification input ``i`` (0 = root).

    Walking stops after an accepted end-of-text: nothing after it counts.
    """
    nodes: list[int] = []
    current = ROOT
    while True:
        choice = target_choice[current + 1]
        nxt = tree.child(current, choice)
        if nxt is None or choice == eot:
            return Acceptance(nodes, choice)
        nodes.append(nxt)
        current = nxt


def accepted_path(tree: DraftTree, emitted: list[int]) -> Acceptance:
    """The nodes a host accepted, from the tokens it emitted after the pass (accepted drafts, then its own).

    Raises ``ValueError`` when the emitted tokens do not follow a path of the tree: the host and the
    drafter disagree about what was proposed, and statistics built on it would be wrong.
    """
    if not emitted:
        raise ValueError("a target pass emits at least one token")
    nodes, current = [], ROOT
    for token in emitted[:-1]:
        nxt = tree.child(current, token)
        if nxt is None:
            raise ValueError(f"emitted token {token} is not a child of node {current} of the proposed tree")
        nodes.append(nxt)
        current = nxt
    return Acceptance(nodes, emitted[-1])

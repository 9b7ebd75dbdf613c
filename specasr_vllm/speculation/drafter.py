"""The draft side of SpecASR for a batch of requests: sync, recycle, draft adaptively, branch, map.

One ``propose`` call per target pass:
1. **Sync.** Each request's accepted target output becomes draft tokens (through the bridge); the
   draft's KV cache is rolled back to the longest prefix still valid and the rest is pending.
2. **Recycle.** The old draft's remainder, realigned after the slip (``recycling``), rides along
   with the pending tokens in one parallel forward under a tree mask; the candidate the draft itself
   agrees with longest becomes the start of the new chain, and the cache keeps exactly that path.
3. **Draft.** Greedy steps while the stopping policy says a token is worth its cost.
4. **Branch.** At the chain's least confident positions, the draft's second choice plus a short
   greedy continuation (extra rows sharing the request's cache state).
5. **Map.** Chain and branches go through the bridge into one ``DraftTree`` of target tokens.
Requests are keyed by any hashable id so the embedded engine and the vLLM proposer share this code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from specasr_vllm.config import SpecConfig
from specasr_vllm.models.kv_cache import DecoderCache
from specasr_vllm.speculation.acceptance import Acceptance
from specasr_vllm.speculation.adaptive import ConfidencePolicy, Costs, FixedLength
from specasr_vllm.speculation.bridge import IdentityBridge, TokenBridge
from specasr_vllm.speculation.draft_model import DraftModel
from specasr_vllm.speculation.recycling import common_prefix, recycle_candidates
from specasr_vllm.speculation.stats import SpecStats
from specasr_vllm.speculation.tree import ROOT, DraftTree

_MARGIN = 128  # draft positions kept free for one round's drafting (chain, candidates, branches)
_RECYCLE_LEN = 12  # longest recycled remainder re-checked


@dataclass
class _Request:
    prefix: list[int]  # the draft's forced prefix
    cached: list[int] = field(default_factory=list)  # draft tokens after the prefix held in the KV cache
    proposal: list[int] = field(default_factory=list)  # the last chain, for recycling
    proposal_at: int = 0  # accepted text length (bytes) when it was proposed
    chain_nodes: list[int] = field(default_factory=list)  # tree nodes of the last chain (calibration)
    passes: int = 0
    accepted: int = 0
    enabled: bool = True
    stats: SpecStats = field(default_factory=SpecStats)


@dataclass
class _Round:
    """One request's work within a ``propose`` call."""

    key: Hashable
    row: int
    budget: int
    pending: list[int]
    first: bool
    candidates: list[list[int]]
    context: list[int]  # the draft's tokens for the accepted output
    context_bytes: int
    chain: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    alts: list[tuple[int, float]] = field(default_factory=list)  # second choice at each chain position
    recycled: int = 0
    next_logp: torch.Tensor | None = None  # the draft's distribution after the chain (None: not computed)


class Drafter:
    def __init__(self, draft: DraftModel, bridge: TokenBridge, config: SpecConfig,
                 policy: ConfidencePolicy | FixedLength, costs: Costs):
        self.draft, self.bridge, self.config, self.policy, self.costs = draft, bridge, config, policy, costs
        self.tokenizer = draft.asr.tokenizer
        self.requests: dict[Hashable, _Request] = {}
        self.keys: list[Hashable] = []  # cache row -> request
        self.cache: DecoderCache | None = None
        self._rounds: list[_Round] = []  # the last proposal, which ``run_ahead`` extends

    # ---- request lifecycle -------------------------------------------------------------------
    def add(self, keys: list[Hashable], features: torch.Tensor | None, prefixes: list[list[int]],
            enabled: list[bool]) -> None:
        """Start requests with the draft encoder's output for each enabled one (or ``None``: attach it
        later); disabled ones never draft. Requests may join while others run (continuous batching)."""
        for key, prefix, on in zip(keys, prefixes, enabled):
            self.requests[key] = _Request(prefix=prefix, enabled=on)
            if not on:
                self.requests[key].stats.fallback = "draft does not serve this language"
        rows = [i for i, on in enumerate(enabled) if on]
        if rows and features is not None:
            self.attach([keys[i] for i in rows], features[rows])

    def attach(self, keys: list[Hashable], features: torch.Tensor) -> None:
        """Give started requests their draft cache rows; a request drafts only once it has one."""
        cache = self.draft.new_cache(features)
        self.cache = cache if self.cache is None else self.cache.cat(cache)
        self.keys += keys

    def stats(self, key: Hashable) -> SpecStats:
        return self.requests[key].stats

    def release(self, keys: list[Hashable]) -> None:
        """Stop drafting for requests (finished, or fallen back to AR) and shrink the cache; stats stay."""
        gone = set(keys)
        keep = [i for i, k in enumerate(self.keys) if k not in gone]
        if self.cache is not None and len(keep) < len(self.keys):
            self.keys = [self.keys[i] for i in keep]
            self.cache = self.cache.select(keep) if keep else None

    def forget(self, keys: list[Hashable]) -> None:
        """Release requests and drop their state and stats (a long-running engine's finished requests)."""
        self.release(keys)
        for key in keys:
            self.requests.pop(key, None)

    # ---- one round -------------------------------------------------------------------------------
    def propose(self, outputs: dict[Hashable, list[int]], budgets: dict[Hashable, int]) -> dict[Hashable, DraftTree]:
        """A draft tree per request (empty where it cannot or should not draft)."""
        trees = {key: DraftTree() for key in outputs}
        rounds = [r for key in outputs if (r := self._sync(key, outputs[key], budgets[key])) is not None]
        if not rounds:
            return trees
        self._catch_up(rounds)
        self._draft(rounds)
        branches = self._branch(rounds) if self.config.tree else {}
        for r in rounds:
            trees[r.key] = self._to_tree(r, branches.get(r.key, []))
        self._rounds = rounds
        return trees

    def run_ahead(self, stop: threading.Event) -> None:
        """While the target verifies, keep drafting past each chain's end as if it will all be accepted.

        Meant for a second thread on the core the target leaves idle. The continuation extends each
        request's proposal: if the target accepts the chain and its bonus token is the draft's next
        token, the next ``propose`` finds the continuation already in the cache and takes it in one
        parallel re-check (recycling); otherwise recycling realigns it like any rejected draft.
        """
        rounds = [r for r in self._rounds if r.chain and r.chain[-1] != self.tokenizer.eot and r.key in self.keys]
        for r in rounds:
            r.row = self.keys.index(r.key)
        steps = 0
        while rounds and not stop.is_set() and steps < self.config.max_draft:
            for r in rounds:
                if r.next_logp is not None:  # else the chain's last token is still to be fed
                    r.chain.append(self._top(r.next_logp)[0])
            rounds = [r for r in rounds if r.chain[-1] != self.tokenizer.eot]
            if not rounds:
                break
            logp = self._forward({r.row: ([r.chain[-1]], [-1], [0]) for r in rounds})
            steps += 1
            for r in rounds:
                self.cache.keep(r.row, int(self.cache.lengths[r.row]), [0])
                req = self.requests[r.key]
                req.cached.append(r.chain[-1])
                req.stats.draft_steps_hidden += 1
                r.next_logp = logp[r.row, 0]
        for r in self._rounds:
            self.requests[r.key].proposal = [t for t in r.chain if t != self.tokenizer.eot]

    def _sync(self, key: Hashable, output: list[int], budget: int) -> _Round | None:
        req = self.requests[key]
        if not req.enabled or key not in self.keys or budget < 1:
            return None
        new = self.bridge.to_draft(output)
        if new is None:
            return None
        row = self.keys.index(key)
        full = req.prefix + new
        if len(full) + _MARGIN > self.cache.capacity:  # too close to the draft's position limit
            return None
        have = (req.prefix + req.cached)[: int(self.cache.lengths[row])]
        keep = min(common_prefix(have, full), len(full) - 1)  # at least one token to feed
        self.cache.lengths[row] = keep
        req.cached = full[len(req.prefix) : keep]
        text = b"".join(self.tokenizer.token_bytes[t] for t in new if t < self.tokenizer.eot)
        candidates = []
        if self.config.recycling and req.proposal:
            pieces = [self.tokenizer.token_bytes[t] for t in req.proposal]
            matched = common_prefix(b"".join(pieces), text[req.proposal_at :])
            candidates = recycle_candidates(req.proposal, pieces, matched, min(_RECYCLE_LEN, self._cap(budget)),
                                            accepted=len(text) - req.proposal_at)
        return _Round(key, row, budget, full[keep:], first=not new, candidates=candidates, context=new,
                      context_bytes=len(text))

    def _cap(self, budget: int) -> int:
        cap = self.config.max_draft if self.config.adaptive else self.config.k
        return min(cap, budget)

    def _forward(self, inputs: dict[int, tuple[list[int], list[int], list[int]]]) -> torch.Tensor:
        """One draft pass over every cache row: per row (tokens, parents, depths); idle rows feed a dummy.

        Parents index within the row's new tokens (-1: the cached context). Returns log-probs
        (rows, n, draft vocab); the caller compacts each row's cache to what it keeps.
        """
        n = max(len(t) for t, _, _ in inputs.values())
        rows = self.cache.batch_size
        tokens = torch.full((rows, n), self.tokenizer.eot, dtype=torch.long)
        mask = torch.eye(n, dtype=torch.bool).repeat(rows, 1, 1)
        depths = torch.zeros(rows, n, dtype=torch.long)
        for row, (toks, parents, dep) in inputs.items():
            tokens[row, : len(toks)] = torch.tensor(toks)
            depths[row, : len(dep)] = torch.tensor(dep)
            for i, p in enumerate(parents):
                if p >= 0:
                    mask[row, i] |= mask[row, p]
        start = self.cache.lengths.clone()
        t0 = time.perf_counter()
        logp = self.draft.decode(tokens, self.cache, mask, depths)
        if n == 1:
            self.costs.observe(draft_step=time.perf_counter() - t0)
        self.cache.lengths = start  # nothing is kept until the caller says so
        return logp

    def _count_step(self, rounds: list[_Round], parallel: set[Hashable] = frozenset()) -> None:
        for r in rounds:
            st = self.requests[r.key].stats
            st.draft_steps += 1
            st.draft_parallel_passes += r.key in parallel

    def _catch_up(self, rounds: list[_Round]) -> None:
        """Feed pending tokens and all recycling candidates in one pass; keep the best-agreeing candidate."""
        inputs, layout = {}, {}
        for r in rounds:
            toks, p = list(r.pending), len(r.pending)
            parents, depths, spans = [i - 1 for i in range(p)], list(range(p)), []
            for cand in r.candidates:  # each candidate hangs below the last pending token
                at = len(toks)
                spans.append(at)
                for j, tok in enumerate(cand):
                    toks.append(tok)
                    parents.append(p - 1 if j == 0 else at + j - 1)
                    depths.append(p + j)
            inputs[r.row] = (toks, parents, depths)
            layout[r.key] = spans
        logp = self._forward(inputs)
        self._count_step(rounds, parallel={r.key for r in rounds if len(inputs[r.row][0]) > 1})
        for r in rounds:
            req = self.requests[r.key]
            p = len(r.pending)
            row_logp = logp[r.row]
            if r.first:
                row_logp = row_logp.clone()
                row_logp[p - 1] = row_logp[p - 1].masked_fill(self.draft.begin_suppress, float("-inf"))
            best, best_at = [], []
            for cand, at in zip(r.candidates, layout[r.key]):
                agreed, prev = [], p - 1
                for j, tok in enumerate(cand):
                    choice = self._top(row_logp[prev])
                    if choice[0] != tok or not self._keep_going(r, len(agreed), choice[1], [q for _, q, _ in agreed]):
                        break
                    agreed.append((tok, choice[1], self._second(row_logp[prev])))
                    prev = at + j
                if len(agreed) > len(best):
                    best, best_at = agreed, list(range(at, at + len(agreed)))
            kept = list(range(p)) + best_at
            self.cache.keep(r.row, int(self.cache.lengths[r.row]), kept)
            req.cached = r.context + [t for t, _, _ in best]
            r.chain = [t for t, _, _ in best]
            r.probs = [q for _, q, _ in best]
            r.alts = [a for _, _, a in best]
            r.recycled = len(best)
            r.next_logp = row_logp[kept[-1]]

    def _top(self, logp: torch.Tensor) -> tuple[int, float]:
        i = int(logp.argmax())
        return int(self.draft.ids[i]), float(logp[i].exp())

    def _second(self, logp: torch.Tensor) -> tuple[int, float]:
        vals, idx = logp.topk(2)
        return int(self.draft.ids[idx[1]]), float(vals[1].exp())

    def _keep_going(self, r: _Round, depth: int, prob: float, probs: list[float]) -> bool:
        if depth >= self._cap(r.budget):
            return False
        if isinstance(self.policy, FixedLength):
            return self.policy.keep_going(depth, prob, 1.0, 0.0)
        path, expected = 1.0, 0.0
        for q in probs:
            path *= self.policy.acceptance(q) if self.config.auto_threshold else q
            expected += path
        return self.policy.keep_going(depth, prob, path, expected)

    def _draft(self, rounds: list[_Round]) -> None:
        """Greedy draft steps, batched, each request stopping on its own (adaptive or fixed length).

        When the draft runs ahead concurrently, a sequential step here costs as much as the tokens it
        would add, so chains are only topped up to ``min_chain`` tokens.
        """
        concurrent = self.config.concurrent_draft
        active = [r for r in rounds if r.chain[-1:] != [self.tokenizer.eot]]
        while active:
            feeding = []
            for r in active:
                tok, prob = self._top(r.next_logp)
                if not self._keep_going(r, len(r.chain), prob, r.probs) or (concurrent and len(r.chain) >= self.config.min_chain):
                    continue
                r.alts.append(self._second(r.next_logp))
                r.chain.append(tok)
                r.probs.append(prob)
                if tok == self.tokenizer.eot:
                    continue
                if len(r.chain) >= self._cap(r.budget) and isinstance(self.bridge, IdentityBridge):
                    r.next_logp = None  # the chain is at its cap, and the bridge needs no look-ahead
                    continue
                feeding.append(r)
            if not feeding:
                return
            logp = self._forward({r.row: ([r.chain[-1]], [-1], [0]) for r in feeding})
            self._count_step(feeding)
            for r in feeding:
                self.cache.keep(r.row, int(self.cache.lengths[r.row]), [0])
                self.requests[r.key].cached.append(r.chain[-1])
                r.next_logp = logp[r.row, 0]
            active = feeding

    def _branch(self, rounds: list[_Round]) -> dict[Hashable, list[tuple[int, list[int], list[float], int | None]]]:
        """Pass two: (position, tokens, probs, next token) for alternatives at weak chain positions."""
        plans = []
        for r in rounds:
            weak = sorted((p, i) for i, p in enumerate(r.probs) if p < self.config.tree_threshold
                          and r.chain[i] != self.tokenizer.eot and i + self.config.tree_depth <= r.budget)
            for _, i in weak[: self.config.tree_branches]:
                plans.append((r, i))
        if not plans:
            return {}
        sub = self.cache.select([r.row for r, _ in plans])  # a private copy per branch
        for j, (r, i) in enumerate(plans):  # cut each copy just before chain position i
            sub.lengths[j] = len(self.requests[r.key].prefix) + len(r.context) + i
        branches = [[r.alts[i][0]] for r, i in plans]
        probs = [[r.alts[i][1]] for r, i in plans]
        nexts: list[int | None] = [None] * len(plans)
        # the identity bridge needs no look-ahead past a branch's last token; the text bridge does
        steps = self.config.tree_depth - isinstance(self.bridge, IdentityBridge)
        for step in range(steps):
            live = [j for j, b in enumerate(branches) if b[-1] != self.tokenizer.eot]
            if not live:
                break
            tokens = torch.tensor([[b[-1]] for b in branches])
            logp = self.draft.decode(tokens, sub)[:, 0]
            self._count_step(list({id(r): r for r, _ in plans}.values()))
            for j in live:
                tok, prob = self._top(logp[j])
                if len(branches[j]) < self.config.tree_depth:
                    branches[j].append(tok)
                    probs[j].append(prob)
                else:
                    nexts[j] = tok
        out: dict[Hashable, list] = {}
        for (r, i), b, p, nxt in zip(plans, branches, probs, nexts):
            out.setdefault(r.key, []).append((i, b, p, nxt))
        return out

    def _to_tree(self, r: _Round, branches: list) -> DraftTree:
        req = self.requests[r.key]
        tree = DraftTree()
        next_tok = self._top(r.next_logp)[0] if r.next_logp is not None else None
        chain = self.bridge.to_target(r.chain, r.probs, next_tok)
        recycled = 0
        if r.recycled:
            after = r.chain[r.recycled] if r.recycled < len(r.chain) else next_tok
            recycled = len(self.bridge.to_target(r.chain[: r.recycled], r.probs[: r.recycled], after).tokens)
        req.chain_nodes = tree.add_path(ROOT, chain.tokens[: r.budget], chain.probs[: r.budget], recycled)
        for i, tokens, probs, nxt in branches:
            mapped = self.bridge.to_target(r.chain[:i] + tokens, r.probs[:i] + probs, nxt)
            if len(tree) + len(mapped.tokens) <= r.budget:  # the target has room for every node
                tree.add_path(ROOT, mapped.tokens, mapped.probs)
        req.proposal = [t for t in r.chain if t != self.tokenizer.eot]
        req.proposal_at = r.context_bytes
        return tree

    # ---- feedback ----------------------------------------------------------------------------------
    def observe(self, key: Hashable, tree: DraftTree, acceptance: Acceptance) -> None:
        """Statistics, calibration of the stopping rule, and the decision to fall back to AR."""
        req = self.requests[key]
        st = req.stats
        if len(tree):
            st.drafted_tokens += len(tree)
            st.tree_nodes += len(tree)
            st.accepted_tokens += len(acceptance.nodes)
            st.recycled_accepted += sum(tree.recycled[i] for i in acceptance.nodes)
            st.acceptance_lengths[len(acceptance.nodes)] += 1
            on_chain = common_prefix(req.chain_nodes, acceptance.nodes)
            self.policy.observe([tree.probs[i] for i in req.chain_nodes], on_chain)
        if not req.enabled:
            return
        req.passes += 1
        req.accepted += len(acceptance.nodes)
        # drafting pays while accepted tokens save more target passes than the draft steps cost
        paid = st.draft_steps * self.costs.draft_step / self.costs.verify + self.config.min_accept * req.passes
        if req.passes >= self.config.fallback_after and req.accepted < paid:
            req.enabled = False
            st.fallback = f"low acceptance ({req.accepted / req.passes:.2f} tokens per pass)"
            self.release([key])

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

import logging
import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from specasr_vllm.config import SpecConfig
from specasr_vllm.models.packing import TreeRow, pack_rows
from specasr_vllm.models.registry import ASRModel
from specasr_vllm.models.tokenizer import WhisperTokenizer
from specasr_vllm.speculation.acceptance import accepted_path
from specasr_vllm.speculation.adaptive import ConfidencePolicy, Costs, FixedLength
from specasr_vllm.speculation.bridge import IdentityBridge, TextSoFar, TokenBridge, make_bridge
from specasr_vllm.speculation.draft_model import DraftModel
from specasr_vllm.speculation.recycling import common_prefix, recycle_candidates
from specasr_vllm.speculation.requests import draft_features, draft_prefix, draft_serves
from specasr_vllm.speculation.stats import SpecStats
from specasr_vllm.speculation.tree import ROOT, DraftTree

log = logging.getLogger(__name__)

_MARGIN = 128  # draft positions kept free for one round's drafting (chain, candidates, branches)
_RECYCLE_LEN = 12  # longest recycled remainder re-checked
_RECENT = 4  # requests the engine-wide judgement of drafting remembers (``paid_lately``)

Choice = tuple[tuple[int, float], tuple[int, float]]  # the draft's (token, probability) first and second choice


@dataclass
class _Request:
    prefix: list[int]  # the draft's forced prefix
    enabled: bool = True
    mel: torch.Tensor | None = None  # the draft's log-mel features until the draft encoder has run
    row: int | None = None  # the request's draft cache row (``None``: not drafting)
    cached: list[int] = field(default_factory=list)  # draft tokens after the prefix held in the KV cache
    proposal: list[int] = field(default_factory=list)  # the last chain, for recycling
    proposal_at: int = 0  # accepted text length (bytes) when it was proposed
    chain_nodes: list[int] = field(default_factory=list)  # tree nodes of the last chain (calibration)
    echo: bool = False  # the draft decodes no timestamps but the target does: repeat its closing ones
    echo_node: int | None = None  # the last tree's repeated timestamp, if it has one
    last_tree: DraftTree | None = None  # what the last ``propose`` sent, awaiting ``feedback``
    text: TextSoFar = field(default_factory=TextSoFar)  # the bridge's reading of the target's output so far
    passes: int = 0  # passes that verified a proposal while the request drafted (judged by ``pays``)
    tokens: int = 0  # what those passes emitted
    spent: float = 0.0  # their measured seconds, this request's share, where AR's price was known (``ar_cost``)
    ar_cost: float = 0.0  # what AR steps as wide as those passes would have cost for their tokens (0: not known)
    judged: bool = False  # whether the engine-wide judgement has counted it (``paid_lately``)
    verdict: bool | None = None  # whether drafting paid for the group it was last judged with (``feedback``)
    stats: SpecStats = field(default_factory=SpecStats)

    def drafted(self) -> bool:
        """Whether the last ``propose`` did draft work for this request: it sent a tree, or an empty one while the
        request drafted (the draft ran before its chain stopped). Such a pass is no AR step: it costs a draft call more.
        Counted as one, on an H200 (a draft call costing about a target step), drafting was judged to pay on 23 of
        32 requests while their decode ran at 0.68x of AR's."""
        return self.last_tree is not None and (len(self.last_tree) > 0 or self.enabled)


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
    next: Choice | None = None  # the draft's choices after the chain (None: not computed)
    ahead: list[Choice] = field(default_factory=list)  # a run's choices after ``next``, already in the cache
    echo: int | None = None  # a target timestamp to propose before the chain (see ``_echo``)


class Drafter:
    """The draft side of SpecASR for any number of concurrent requests, keyed by any hashable id.

    A host (the embedded engine, the vLLM proposer) only starts requests, asks for trees, reports
    what the target emitted and releases requests; statistics and cost estimates live here.
    """

    def __init__(self, draft: DraftModel, bridge: TokenBridge, config: SpecConfig, target_eot: int,
                 target_timestamp_begin: int):
        self.draft, self.bridge, self.config = draft, bridge, config
        self._target_eot = target_eot
        self._target_timestamp_begin = target_timestamp_begin
        self.costs = Costs()
        self.policy: ConfidencePolicy | FixedLength = (
            ConfidencePolicy(config.threshold, cap=config.max_draft, auto=config.auto_threshold, costs=self.costs)
            if config.adaptive else FixedLength(config.k))
        self._tok: WhisperTokenizer = draft.asr.tokenizer
        self.requests: dict[Hashable, _Request] = {}
        self.cache = draft.empty_cache(1)
        self._rounds: list[_Round] = []  # the last proposal, which ``run_ahead`` extends
        self._outcomes: deque[bool] = deque(maxlen=_RECENT)  # whether drafting paid, per recent judged request
        self._since_probe = 0  # requests started without drafting since the last one that drafted

    @classmethod
    def build(cls, draft: ASRModel, target_tokenizer: WhisperTokenizer, config: SpecConfig,
              compile: bool = False, graphs: bool | None = None) -> Drafter:
        """A drafter for ``draft`` (loaded on the device it should run on) proposing in the target's vocabulary;
        ``compile`` and ``graphs`` as ``DraftModel``'s."""
        return cls(DraftModel(draft, config, compile, graphs), make_bridge(target_tokenizer, draft.tokenizer), config,
                   target_tokenizer.eot, target_tokenizer.timestamp_begin)

    @property
    def device(self) -> torch.device:
        return self.draft.device

    def warm(self, rows: int | None = None) -> None:
        """Compile and trace what the draft's first request would otherwise wait for (``DraftModel.warm``: its
        encoder at every input length, its step graphs on this drafter's cache, rows reserved on a GPU for
        ``rows`` requests drafting together, by default ``max_batch``, and, with the tree, each one's branches)."""
        rows = min(rows or self.config.max_batch, self.config.max_batch)
        branches = self.config.tree_branches if self.config.tree else 0
        self.draft.warm(self.cache, rows, rows * (1 + branches))

    # ---- request lifecycle -------------------------------------------------------------------
    def admit(self) -> bool:
        """Whether a new request, or a new batch of requests that decode together, should draft: yes while drafting
        paid lately (``paid_lately``), else only every ``probe_every``-th time, to notice when it pays again. A batch
        asks once for all its rows: a row that decodes as AR among drafting rows, or drafts among rows that decode as
        AR, gains nothing, since every pass is as wide and as slow as its widest row's."""
        if self.paid_lately():
            self._since_probe = 0
            return True
        self._since_probe += 1
        if self._since_probe < self.config.probe_every:
            return False
        self._since_probe = 0
        return True

    def start(self, key: Hashable, language: str, task: str = "transcribe", timestamps: bool = False,
              prompt: str | None = None, mel: torch.Tensor | None = None, audio: np.ndarray | None = None,
              admitted: bool | None = None) -> bool:
        """Register a request; returns whether the draft serves it (else it runs as AR, never drafting).

        ``mel`` is the target's (n_mels, frames) log-mel window and/or ``audio`` its 16 kHz samples;
        the draft encoder runs once, over the audio's frames only (``draft_unpadded``), when the
        request first drafts. Requests may join while others run (continuous batching). ``admitted``: the host's
        ``admit`` for the batch this request decodes in (None: asked here, for this request alone).
        """
        if key in self.requests:
            raise ValueError(f"request {key!r} is already started")
        identity = isinstance(self.bridge, IdentityBridge)  # a text bridge carries no timestamps
        req = _Request(prefix=draft_prefix(self._tok, language, task, timestamps and identity, prompt),
                       echo=timestamps and not identity)
        self.requests[key] = req
        req.enabled = draft_serves(self._tok, language, task)
        if not req.enabled:
            req.stats.fallback = "draft does not serve this language"
            return False
        if not (self.admit() if admitted is None else admitted):  # decode as AR, unless it is time to look again
            req.enabled = False
            req.stats.fallback = "drafting has not paid lately"
            return False
        req.mel = draft_features(self.draft.asr.n_mels, mel, audio, self.config.draft_unpadded,
                                 self.draft.frame_multiple)
        return True

    def drafting(self, key: Hashable) -> bool:
        """Whether the request may still draft (neither declined nor fallen back to AR)."""
        return self.requests[key].enabled

    def stats(self, key: Hashable) -> SpecStats:
        """A request's counters (read them; the drafter keeps them up to date)."""
        return self.requests[key].stats

    def decline(self, keys: list[Hashable], reason: str) -> None:
        """Requests the host decides to run as AR from now on: they never draft again (their draft encoder
        never runs if it has not), and their statistics say why."""
        for key in keys:
            req = self.requests[key]
            req.enabled = False
            req.stats.fallback = req.stats.fallback or reason
        self._stop_drafting(keys)

    def finish(self, keys: list[Hashable]) -> None:
        """Requests that will emit nothing more: free their draft state now (statistics stay until ``release``),
        and remember whether drafting paid for them (where they drafted for ``fallback_after`` passes: the rule
        that judges one request judges the engine's drafting too)."""
        self._end([k for k in keys if k in self.requests])

    def release(self, keys: list[Hashable]) -> dict[Hashable, SpecStats]:
        """Forget requests; returns each one's final statistics."""
        self._end([k for k in keys if k in self.requests])
        return {key: self.requests.pop(key).stats for key in keys if key in self.requests}

    def _end(self, keys: list[Hashable]) -> None:
        for key in keys:
            req = self.requests[key]
            if req.enabled and req.passes >= self.config.fallback_after:
                self._judged(req, req.verdict if req.verdict is not None else self.pays([req]))
        self._stop_drafting(keys)

    def _stop_drafting(self, keys: list[Hashable]) -> None:
        """Free the draft cache rows of ``keys`` and move the remaining rows to the front."""
        rows = [self.requests[k].row for k in keys if self.requests[k].row is not None]
        for key in keys:
            self.requests[key].row = None
            self.requests[key].mel = None
        if not rows:
            return
        self.cache.release(rows)
        live = [req for req in self.requests.values() if req.row is not None]
        for req, row in zip(live, self.cache.compact([req.row for req in live])):
            req.row = row

    def prepare(self, keys: list[Hashable]) -> None:
        """Run the draft encoder for requests about to draft for the first time, each over its own frames
        (``propose`` does it when needed; a host calls this to time it, or to do it while the target waits)."""
        for key in keys:
            req = self.requests[key]
            if req.mel is not None and req.row is None:
                features = self.draft.encode(req.mel[None])
                req.row = self.cache.claim(*self.draft.cross_kv(features))[0]
                req.mel = None

    def _live_rows(self) -> list[int]:
        return sorted(req.row for req in self.requests.values() if req.row is not None)

    # ---- one round -------------------------------------------------------------------------------
    def propose(self, outputs: dict[Hashable, list[int]], budgets: dict[Hashable, int]) -> dict[Hashable, DraftTree]:
        """A draft tree per request (empty where it cannot or should not draft).

        ``outputs[key]`` is everything the target emitted for the request so far (after its prefix);
        ``budgets[key]`` the most nodes the target will verify for it this pass.
        """
        self.prepare([key for key in outputs if budgets[key] >= 1])
        if sum(self.requests[key].enabled and budgets[key] >= 1 for key in outputs) > 1:
            # several requests draft: each one's verification is as wide as the longest tree of the pass
            budgets = {key: min(budget, self.config.batch_draft) for key, budget in budgets.items()}
        trees = {key: DraftTree() for key in outputs}
        rounds = [r for key in outputs if (r := self._sync(key, outputs[key], budgets[key])) is not None]
        if rounds:
            self._catch_up(rounds)
            self._draft(rounds)
            branches = self._branch(rounds) if self.config.tree else {}
            for r in rounds:
                trees[r.key] = self._to_tree(r, branches.get(r.key, []))
        self._rounds = rounds
        for key, tree in trees.items():
            self.requests[key].last_tree = tree
        return trees

    def run_ahead(self, stop: threading.Event) -> None:
        """While the target verifies, keep drafting past each chain's end as if it will all be accepted.

        Meant for a second thread on the core the target leaves idle. The continuation extends each
        request's proposal: if the target accepts the chain and its bonus token is the draft's next
        token, the next ``propose`` finds the continuation already in the cache and takes it in one
        parallel re-check (recycling); otherwise recycling realigns it like any rejected draft.
        """
        eot = self._tok.eot
        rounds = [r for r in self._rounds if r.chain and r.chain[-1] != eot and self.requests[r.key].row is not None]
        for r in rounds:
            r.row = self.requests[r.key].row
        steps = 0
        while rounds and not stop.is_set() and steps < self.config.max_draft:
            for r in rounds:
                if r.next is not None:  # else the chain's last token is still to be fed
                    r.chain.append(r.next[0][0])
            rounds = [r for r in rounds if r.chain[-1] != eot]
            if not rounds:
                break
            choices = self._forward({r.row: TreeRow.chain([r.chain[-1]]) for r in rounds})
            steps += 1
            for r in rounds:
                self.cache.keep(r.row, self.cache.length(r.row), [0])
                req = self.requests[r.key]
                req.cached.append(r.chain[-1])
                req.stats.draft_steps_hidden += 1
                r.next = choices[r.row][0]
        for r in self._rounds:
            self.requests[r.key].proposal = [t for t in r.chain if t != eot]

    def _sync(self, key: Hashable, output: list[int], budget: int) -> _Round | None:
        req = self.requests[key]
        if not req.enabled or req.row is None or budget < 1:
            return None
        new = self.bridge.to_draft(output, req.text)
        if new is None:
            return None
        full = req.prefix + new
        if len(full) + _MARGIN > self.cache.capacity:  # too close to the draft's position limit
            return None
        have = (req.prefix + req.cached)[: self.cache.length(req.row)]
        keep = min(common_prefix(have, full), len(full) - 1)  # at least one token to feed
        self.cache.set_length(req.row, keep)
        req.cached = full[len(req.prefix) : keep]
        token_bytes = self._tok.token_bytes
        text = b"".join(token_bytes[t] for t in new if t < self._tok.eot)
        candidates = []
        if self.config.recycling and req.proposal:
            pieces = [token_bytes[t] for t in req.proposal]
            matched = common_prefix(b"".join(pieces), text[req.proposal_at :])
            candidates = recycle_candidates(req.proposal, pieces, matched, min(_RECYCLE_LEN, self._cap(budget)),
                                            accepted=len(text) - req.proposal_at)
        return _Round(key, req.row, budget, full[keep:], first=not new, candidates=candidates, context=new,
                      context_bytes=len(text), echo=self._echo(req, output))

    def _echo(self, req: _Request, output: list[int]) -> int | None:
        """The timestamp that just closed a segment, when the draft cannot propose timestamps itself.

        Whisper opens the next segment where the last one closed (``<|t|><|t|>``), so repeating the
        closing timestamp before the drafted text usually saves the pass that would emit it alone;
        when the target opens elsewhere, the pass still yields its own token, as without the repeat.
        """
        ts = self._target_timestamp_begin
        closing = req.echo and len(output) >= 2 and output[-1] >= ts and output[-2] < self._target_eot
        return output[-1] if closing else None

    def _cap(self, budget: int) -> int:
        cap = self.config.max_draft if self.config.adaptive else self.config.k
        return min(cap, budget)

    def _forward(self, inputs: dict[int, TreeRow], begin: dict[int, int] | None = None,
                 rows: list[int] | None = None) -> dict[int, list[Choice]]:
        """One draft pass over ``rows`` (default: every live row; rows without input feed a dummy).

        Returns, per row with input, the draft's two best (token, probability) at each new token, read
        from the device in one transfer; ``begin[row]`` marks the position where Whisper's begin rules
        apply. Nothing is kept in the cache: the caller compacts each row to what it keeps.
        """
        rows = self._live_rows() if rows is None else rows
        dummy = TreeRow.chain([self._tok.eot])
        batch = [inputs.get(row, dummy) for row in rows]
        packed = pack_rows(batch, self._tok.eot, self.device)  # greedy steps: chains of one, no mask
        starts = self.cache.lengths(rows)
        t0 = time.perf_counter()
        host = self.draft.choices(packed.tokens, self.cache, rows, packed.mask, packed.depths,
                                  {rows.index(row): pos for row, pos in (begin or {}).items()})
        if packed.tokens.shape[1] == 1:
            self.costs.observe(draft_step=time.perf_counter() - t0)
        return self._read(host, rows, starts, {row: len(tree_row.tokens) for row, tree_row in inputs.items()})

    def _forward_run(self, rounds: list[_Round]) -> dict[int, list[Choice]]:
        """A run of greedy draft steps (``DraftModel.run``) from each round's last chain token, over every live
        row (rows without a round feed a dummy): per round's row, the choices after each step, ``run_length``
        of them. As ``_forward``, each row's cache is left at its length before the call; the run's slots past
        it hold the K/V of the tokens fed, the chain's last token first, for a caller that keeps them.

        Where a run would pass the draft's position limit, or a round's row is not in one block of rows, it
        falls back to a single step (a list of one choice)."""
        rows = self._live_rows()
        n = self.draft.run_length
        starts = self.cache.lengths(rows)
        if rows != list(range(rows[0], rows[0] + len(rows))) or max(starts) + n > self.cache.capacity:
            return self._forward({r.row: TreeRow.chain([r.chain[-1]]) for r in rounds})
        feed = {r.row: r.chain[-1] for r in rounds}
        tokens = torch.tensor([[feed.get(row, self._tok.eot)] for row in rows], device=self.device)
        t0 = time.perf_counter()
        host = self.draft.run(tokens, self.cache, rows)
        self.costs.observe(draft_step=(time.perf_counter() - t0) / n)
        return self._read(host, rows, starts, {row: n for row in feed})

    def _read(self, host: torch.Tensor, rows: list[int], starts: list[int], wanted: dict[int, int]
              ) -> dict[int, list[Choice]]:
        """Roll ``rows`` back to their ``starts`` and read a draft call's (2, batch, n, 2) choices from the host
        tensor: the first ``wanted[row]`` of each row asked for (ids are exact as floats, < 2**24)."""
        for row, start in zip(rows, starts):
            self.cache.set_length(row, start)
        ids, probs = host.tolist()
        return {row: [((int(i[0]), p[0]), (int(i[1]), p[1])) for i, p in zip(ids[b], probs[b])][: wanted[row]]
                for b, row in enumerate(rows) if row in wanted}

    def _count_step(self, rounds: list[_Round], parallel: set[Hashable] = frozenset(), steps: int = 1) -> None:
        """``steps`` draft steps for each round (a run counts every step it computed, used or not)."""
        for r in rounds:
            st = self.requests[r.key].stats
            st.draft_steps += steps
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
            inputs[r.row] = TreeRow(toks, parents, depths)
            layout[r.key] = spans
        choices = self._forward(inputs, begin={r.row: len(r.pending) - 1 for r in rounds if r.first})
        self._count_step(rounds, parallel={r.key for r in rounds if len(inputs[r.row].tokens) > 1})
        for r in rounds:
            req = self.requests[r.key]
            p = len(r.pending)
            row = choices[r.row]
            best, best_at = [], []
            for cand, at in zip(r.candidates, layout[r.key]):
                agreed, prev = [], p - 1
                for j, tok in enumerate(cand):
                    (top, prob), second = row[prev]
                    if top != tok or not self._keep_going(r, len(agreed), prob, [q for _, q, _ in agreed]):
                        break
                    agreed.append((tok, prob, second))
                    prev = at + j
                if len(agreed) > len(best):
                    best, best_at = agreed, list(range(at, at + len(agreed)))
            kept = list(range(p)) + best_at
            self.cache.keep(r.row, self.cache.length(r.row), kept)
            req.cached = r.context + [t for t, _, _ in best]
            r.chain = [t for t, _, _ in best]
            r.probs = [q for _, q, _ in best]
            r.alts = [a for _, _, a in best]
            r.recycled = len(best)
            r.next = row[kept[-1]]

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
        eot = self._tok.eot
        active = [r for r in rounds if r.chain[-1:] != [eot]]
        while active:
            feeding = []
            for r in active:
                (tok, prob), second = r.next
                if not self._keep_going(r, len(r.chain), prob, r.probs) or (
                        concurrent and len(r.chain) >= self.config.min_chain):
                    continue
                r.alts.append(second)
                r.chain.append(tok)
                r.probs.append(prob)
                if tok == eot:
                    continue
                if len(r.chain) >= self._cap(r.budget) and isinstance(self.bridge, IdentityBridge):
                    r.next = None  # the chain is at its cap, and the bridge needs no look-ahead
                    continue
                feeding.append(r)
            if not feeding:
                return
            if all(r.ahead for r in feeding):  # a run computed these steps already: their K/V are in the cache
                for r in feeding:
                    self.cache.advance([r.row], 1)
                    r.next = r.ahead.pop(0)
            else:
                choices = self._forward_run(feeding) if self.draft.run_length > 1 else \
                    self._forward({r.row: TreeRow.chain([r.chain[-1]]) for r in feeding})
                self._count_step(feeding, steps=len(choices[feeding[0].row]))  # a run counts each step it computed
                for r in feeding:
                    self.cache.keep(r.row, self.cache.length(r.row), [0])
                    r.next, *r.ahead = choices[r.row]
            for r in feeding:
                self.requests[r.key].cached.append(r.chain[-1])
            active = feeding

    def _branch(self, rounds: list[_Round]) -> dict[Hashable, list[tuple[int, list[int], list[float], int | None]]]:
        """Pass two: (position, tokens, probs, next token) for alternatives at weak chain positions."""
        eot = self._tok.eot
        plans = []
        for r in rounds:
            weak = sorted((p, i) for i, p in enumerate(r.probs) if p < self.config.tree_threshold
                          and r.chain[i] != eot and i + self.config.tree_depth <= r.budget)
            for _, i in weak[: self.config.tree_branches]:
                plans.append((r, i))
        if not plans:
            return {}
        # a private row per branch, cut just before chain position i
        forks = [self.cache.fork(r.row, len(self.requests[r.key].prefix) + len(r.context) + i) for r, i in plans]
        branches = [[r.alts[i][0]] for r, i in plans]
        probs = [[r.alts[i][1]] for r, i in plans]
        nexts: list[int | None] = [None] * len(plans)
        # the identity bridge needs no look-ahead past a branch's last token; the text bridge does
        steps = self.config.tree_depth - isinstance(self.bridge, IdentityBridge)
        try:
            for _ in range(steps):
                live = [j for j, b in enumerate(branches) if b[-1] != eot]
                if not live:
                    break
                choices = self._forward({row: TreeRow.chain([b[-1]]) for row, b in zip(forks, branches)}, rows=forks)
                for row in forks:
                    self.cache.advance([row], 1)
                self._count_step(list({id(r): r for r, _ in plans}.values()))
                for j in live:
                    tok, prob = choices[forks[j]][0][0]
                    if len(branches[j]) < self.config.tree_depth:
                        branches[j].append(tok)
                        probs[j].append(prob)
                    else:
                        nexts[j] = tok
        finally:
            self.cache.release(forks)
        out: dict[Hashable, list] = {}
        for (r, i), b, p, nxt in zip(plans, branches, probs, nexts):
            out.setdefault(r.key, []).append((i, b, p, nxt))
        return out

    def _to_tree(self, r: _Round, branches: list) -> DraftTree:
        req = self.requests[r.key]
        tree = DraftTree()
        next_tok = r.next[0][0] if r.next is not None else None
        chain = self.bridge.to_target(r.chain, r.probs, next_tok)
        recycled = 0
        if r.recycled:
            after = r.chain[r.recycled] if r.recycled < len(r.chain) else next_tok
            recycled = len(self.bridge.to_target(r.chain[: r.recycled], r.probs[: r.recycled], after).tokens)
        root, room = ROOT, r.budget
        req.echo_node = None
        if r.echo is not None and r.budget >= 2:
            req.echo_node = root = tree.add_path(ROOT, [r.echo])[0]
            room -= 1
        req.chain_nodes = tree.add_path(root, chain.tokens[:room], chain.probs[:room], recycled)
        for i, tokens, probs, nxt in branches:
            mapped = self.bridge.to_target(r.chain[:i] + tokens, r.probs[:i] + probs, nxt)
            if len(tree) + len(mapped.tokens) <= r.budget:  # the target has room for every node
                tree.add_path(root, mapped.tokens, mapped.probs)
        req.proposal = [t for t in r.chain if t != self._tok.eot]
        req.proposal_at = r.context_bytes
        return tree

    # ---- feedback ----------------------------------------------------------------------------------
    def feedback(self, emitted: dict[Hashable, list[int]], seconds: float | None = None,
                 pass_seconds: float | None = None) -> None:
        """What one target pass emitted for each request (accepted draft tokens, then the target's own), what
        its verification cost (``seconds``; ``None``: unknown, e.g. a pass that verified no draft) and what the
        whole pass cost (``pass_seconds``: proposing, verifying and the host's bookkeeping, from the start of
        one pass to the start of the next).

        Updates statistics, calibrates the stopping rule, prices passes by their width for it (``PassLine``, from
        passes of one request), learns what an AR step costs (a pass that did no draft work for any request is
        one) and decides whether drafting still pays for each request (``pays``; else the request continues as AR).
        """
        if seconds is not None:
            self.costs.observe(verify=seconds)
        share = None if pass_seconds is None or not emitted else pass_seconds / len(emitted)
        if share is not None and len(emitted) <= self.config.max_batch and \
                not any(self.requests[key].drafted() for key in emitted):  # an AR step: no draft work in it
            self.costs.observe(ar_step=share, rows=len(emitted))  # as wide as drafting's
        price = None if share is None else self.costs.ar_price(len(emitted))  # AR's, a token per row, this wide
        if pass_seconds is not None and len(emitted) == 1:
            req = self.requests[next(iter(emitted))]
            if req.drafted():  # one request's drafting pass: what the stopping rule prices, by the tree's width
                self.costs.passes.observe(len(req.last_tree), pass_seconds)
        judged = []
        for key, tokens in emitted.items():
            req = self.requests[key]
            st = req.stats
            st.target_passes += 1
            st.output_tokens += sum(t != self._target_eot for t in tokens)  # text and timestamps, not the end
            tree, req.last_tree = req.last_tree, None
            if tree is None:  # nothing was proposed for this pass (a prefill, an AR step, a host that skipped drafting)
                continue
            try:
                acceptance = accepted_path(tree, tokens)
            except ValueError as exc:  # the host verified something else: keep serving, say so, learn nothing
                log.warning("request %r: %s; this pass is left out of the statistics", key, exc)
                continue
            if len(tree):
                st.drafted_tokens += len(tree)
                st.accepted_tokens += len(acceptance.nodes)
                st.recycled_accepted += sum(tree.recycled[i] for i in acceptance.nodes)
                st.acceptance_lengths[len(acceptance.nodes)] += 1
                echoed = req.echo_node is not None
                if not echoed or acceptance.nodes[:1] == [req.echo_node]:  # else the chain was never judged
                    drafted = acceptance.nodes[1:] if echoed else acceptance.nodes
                    self.policy.observe([tree.probs[i] for i in req.chain_nodes], common_prefix(req.chain_nodes, drafted))
            if not req.enabled:
                continue
            req.passes += 1
            req.tokens += len(tokens)
            if price is not None:
                req.spent += share
                req.ar_cost += len(tokens) * price
            if req.passes >= self.config.fallback_after:
                judged.append(key)
        # the requests this pass judges, together: they share every pass, so they draft together or not at all
        group = [self.requests[key] for key in judged]
        paid = self.pays(group) if group else True
        for req in group:
            req.verdict = paid
        if not paid:
            for key, req in zip(judged, group):
                self._judged(req, False)
                req.enabled = False
                req.stats.fallback = f"drafting does not pay ({req.tokens / req.passes:.2f} tokens per pass" + \
                    (f", {len(group)} requests judged together)" if len(group) > 1 else ")")
            self._stop_drafting(judged)

    def pays(self, group: list[_Request]) -> bool:
        """Whether drafting pays for ``group``, requests judged together (one, or a batch that shares its passes).
        Measured where the host reports whole passes and an AR step has been timed (the embedded engine times one
        before it first drafts, at one row and at its widest batch): their passes emit tokens no more than
        ``max_loss`` slower than AR steps as wide as each pass would (each one's share of a pass against AR's price
        per row at that width, ``Costs.ar_price``). Else modelled: their accepted tokens must pay for their draft
        steps, priced in verification passes, and earn ``min_accept`` a pass more.

        Why together: in a batch a request that stops drafting saves little (the others' trees still set each
        pass's width and its draft steps) and emits one token a pass, so the batch needs more of those passes;
        judged alone, the requests the draft guesses worst fell back one by one and the batch ran slower than AR."""
        c = self.costs
        if all(req.ar_cost for req in group):
            return sum(r.ar_cost for r in group) >= sum(r.spent for r in group) * (1 - self.config.max_loss)
        accepted = sum(r.tokens - r.passes for r in group)  # each pass also emits the target's own token
        steps, passes = sum(r.stats.draft_steps for r in group), sum(r.passes for r in group)
        return accepted >= steps * c.draft_step / c.verify + self.config.min_accept * passes

    def paid_lately(self) -> bool:
        """False where drafting did not pay (``pays``, on measured time) for any of the last ``_RECENT`` requests
        judged: a host where it never pays (a GPU with this pair) stops paying for drafting on every request,
        and a burst of hard requests (a poem the draft cannot guess) is not enough to stop it."""
        return len(self._outcomes) < _RECENT or any(self._outcomes)

    def _judged(self, req: _Request, paid: bool) -> None:
        """Remember once per request whether drafting paid for it, where that was measured."""
        if req.ar_cost and not req.judged:
            req.judged = True
            self._outcomes.append(paid)

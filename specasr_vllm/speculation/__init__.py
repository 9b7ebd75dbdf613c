"""SpecASR's algorithm, engine-agnostic: what the embedded engine and the vLLM proposer share.

In the spirit of vLLM's ``v1/spec_decode``: the drafter only proposes, acceptance is its own rule.

    drafter = Drafter.build(draft_model, target_tokenizer, spec_config)     # draft on its device
    drafter.start(key, language, task, timestamps, prompt, mel=..., audio=...)  # -> does the draft serve it
    trees = drafter.propose({key: emitted_so_far}, {key: max_nodes})        # a DraftTree per request
    # the host verifies each tree in one target pass: verification rows from ``tree.verification_row``,
    # packed with ``pack_rows``, greedy acceptance with ``accept_greedy``
    drafter.feedback({key: tokens_emitted_this_pass}, seconds_of_the_pass)
    final_stats = drafter.release([key])

The drafter alone owns its statistics (``stats(key)``), its cost estimates and its stopping rule.
"""

from specasr_vllm.models.packing import PackedRows, TreeRow, pack_rows
from specasr_vllm.speculation.acceptance import Acceptance, accept_greedy, accepted_path
from specasr_vllm.speculation.drafter import Drafter
from specasr_vllm.speculation.stats import SpecStats
from specasr_vllm.speculation.tree import ROOT, DraftTree

__all__ = ["ROOT", "Acceptance", "DraftTree", "Drafter", "PackedRows", "SpecStats", "TreeRow", "accept_greedy",
           "accepted_path", "pack_rows"]

"""Self-speculative decoding with the MTP module as the draft model (V3 §5.4.3), greedy, one sequence.

Each round: the main model verifies [t_n, draft] in one forward at positions n, n+1. If its choice after t_n equals
the draft, both the draft and the main model's next choice are kept (two tokens for one forward); otherwise its own
choice replaces the draft. The MTP module then reads the new hidden states (filling its own cache) and drafts again.
Rejected positions need no rollback: the cache is indexed by position and gets overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoseek.infer.cache import LatentCache
from nanoseek.model.transformer import Transformer


@dataclass
class SpeculativeResult:
    token_ids: list[int]
    drafted: int
    accepted: int
    main_forwards: int

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.drafted)


@torch.no_grad()
def speculative_greedy(model: Transformer, prompt: list[int], max_new_tokens: int,
                       stop_token_ids: tuple[int, ...] = ()) -> SpeculativeResult:
    if not len(model.mtp):
        raise ValueError("speculative decoding needs a model with an MTP module (num_nextn_predict_layers >= 1)")
    if len(prompt) + max_new_tokens + 1 > model.config.max_position_embeddings:
        raise ValueError("prompt + max_new_tokens exceeds the model's context")
    device = next(model.parameters()).device
    cache = LatentCache(model.config, 1, len(prompt) + max_new_tokens + 1, device,
                        next(model.parameters()).dtype)

    def positions(start: int, count: int) -> torch.Tensor:
        return torch.arange(start, start + count, device=device)[None]

    ids = torch.tensor([prompt], device=device)
    logits, hidden = model.forward_cached(ids, positions(0, len(prompt)), cache)
    out = [int(logits[0, -1].argmax())]
    # MTP over every prompt position i reads (h_i, t_{i+1}); its last position drafts the token after out[0].
    mtp_inputs = torch.cat([ids[:, 1:], torch.tensor([[out[0]]], device=device)], dim=1)
    draft_logits, _ = model.mtp_forward_cached(hidden, mtp_inputs, positions(0, len(prompt)), cache)
    draft = int(draft_logits[0, -1].argmax())
    drafted = accepted = forwards = 0
    n = len(prompt)  # position of out[-1]
    while len(out) < max_new_tokens and out[-1] not in stop_token_ids:
        step = torch.tensor([[out[-1], draft]], device=device)
        logits, hidden = model.forward_cached(step, positions(n, 2), cache)
        forwards += 1
        drafted += 1
        choice = int(logits[0, 0].argmax())
        if choice == draft:
            accepted += 1
            bonus = int(logits[0, 1].argmax())
            new, verified_hidden = [draft, bonus], hidden
        else:
            new, verified_hidden = [choice], hidden[:, :1]
        out.extend(new)
        draft_logits, _ = model.mtp_forward_cached(verified_hidden, torch.tensor([new], device=device),
                                                   positions(n, len(new)), cache)
        draft = int(draft_logits[0, -1].argmax())
        n += len(new)
    for cut, token in enumerate(out):  # the same stop and length rules as plain decoding
        if token in stop_token_ids:
            out = out[:cut]
            break
    return SpeculativeResult(out[:max_new_tokens], drafted, accepted, forwards)

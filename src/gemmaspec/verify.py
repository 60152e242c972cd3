"""Verification: the one place that decides which tokens are emitted.

The target has scored the last accepted token plus k drafted tokens in one forward pass, giving k + 1 rows
of logits. Greedy keeps the longest prefix of drafts equal to the target's argmax plus the target's own next
token. Sampling applies the rejection rule of Leviathan et al. 2023 / Chen et al. 2023: accept draft x_i with
probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection sample from normalize(max(0, p_i - q_i));
if every draft is accepted, sample a bonus token from p_k. The emitted tokens are then distributed exactly
as the target's own samples. Drafters without probabilities (n-gram) are deterministic: q is one-hot.
"""

from __future__ import annotations

import torch

from .sampling import SamplingParams, greedy_tokens, probabilities, sample


def verify(
    target_logits: torch.Tensor | None,
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
    greedy: list[int] | None = None,
) -> tuple[int, int]:
    """Returns (number of drafts accepted, the next token chosen by the target). greedy: each row's argmax of
    target_logits when the caller has it (the target's pass computed it; greedy decoding then needs no logits)."""
    k = len(draft_tokens)
    if params.greedy:
        best = greedy if greedy is not None else greedy_tokens(target_logits)
        n = 0
        while n < k and draft_tokens[n] == best[n]:
            n += 1
        return n, best[n]

    p = probabilities(target_logits, params)
    if k:
        drafts = torch.tensor(draft_tokens, device=p.device)
        rows = torch.arange(k, device=p.device)
        p_draft = p[rows, drafts]
        q_draft = draft_probs[rows, drafts].to(p.dtype) if draft_probs is not None else torch.ones_like(p_draft)
        u = torch.rand(k, generator=generator, device=p.device)
        rejected = (u * q_draft > p_draft).tolist()  # u < p/q  <=>  accept
        for i in range(k):
            if rejected[i]:
                if draft_probs is not None:
                    residual = (p[i] - draft_probs[i].to(p.dtype)).clamp_min(0)
                else:
                    residual = p[i].clone()
                    residual[draft_tokens[i]] = 0
                total = residual.sum()
                # p == q up to rounding leaves no residual mass; then p itself is the right distribution.
                dist = residual / total if total > 0 else p[i]
                return i, sample(dist, generator)
    return k, sample(p[k], generator)

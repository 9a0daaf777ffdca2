"""Per-token log-probabilities and entropy of target tokens, without the logits wall.

The LM head runs over `chunk_size` tokens at a time inside an activation checkpoint, so neither
the forward nor the backward ever holds the full (tokens, vocab) fp32 logits: with Qwen's
151,936-word vocabulary that tensor is 600 KB per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    temperature: float, with_entropy: bool, suppress: torch.Tensor | None, entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, weight, bias).float()  # (C, V)
    if temperature != 1.0:
        logits = logits / temperature
    if suppress is not None:
        logits = mask_suppressed(logits, suppress)
    log_z = torch.logsumexp(logits, dim=-1)  # (C,)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z  # (C,)
    if with_entropy:
        source, z = (logits, log_z) if entropy_grad else (logits.detach(), log_z.detach())
        probs = torch.softmax(source, dim=-1)
        entropy = z - (probs * source).sum(-1)  # H = logZ - E_p[logit]
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy


_head = {"chunk": _chunk_logprobs}  # the per-chunk function token_logprobs runs (see compile_head)


def compile_head(enable: bool = True) -> None:
    """Run each chunk through torch.compile (process-wide): the fp32 cast, temperature, logsumexp,
    gather and entropy become a few fused reductions over the (C, V) logits, forward and backward,
    instead of one pass per op. The matmul stays cuBLAS. `enable=False` restores eager."""
    _head["chunk"] = torch.compile(_chunk_logprobs, dynamic=True) if enable else _chunk_logprobs


def mask_suppressed(logits: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
    """Logits with the `suppress` token ids made impossible. The most negative finite float
    rather than -inf, so that p * logit is 0 (not NaN) in the entropy."""
    return logits.index_fill(-1, suppress, torch.finfo(logits.dtype).min)


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Linear,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    suppress_ids: list[int] | None = None,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[i] | hidden[i]) and the entropy of that distribution, both (N,) float32.

    hidden: (N, H) states whose next token is `targets` (N,). Gradients flow to `hidden` and the
    head; each chunk's logits are recomputed in the backward instead of being stored.
    `suppress_ids`: tokens the sampler never emits (see Processor.suppress_token_ids); the
    distribution is renormalised without them, exactly as the rollout's was.
    `entropy_grad=False`: the entropy is a metric only (no gradient, no backward work).
    """
    suppress = torch.tensor(suppress_ids, device=hidden.device) if suppress_ids else None
    logps, entropies = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head.weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size]
        t = targets[start : start + chunk_size]
        args = (h, lm_head.weight, lm_head.bias, t, temperature, with_entropy, suppress, entropy_grad)
        chunk = _head["chunk"]
        logp, ent = checkpoint(chunk, *args, use_reentrant=False) if grad else chunk(*args)
        logps.append(logp)
        entropies.append(ent)
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)

"""Next-token sampling on the GPU, without host syncs.

    tokens, logprobs = sample(logits, temperature=1.0, top_p=0.9, top_k=50, generator=g)

The returned log-probability is the one the trainer computes: log_softmax(logits / temperature)
of the sampled token over the full vocabulary (suppressed ids masked), with no top-p/top-k
renormalisation. Sampling itself follows transformers' warpers: temperature, then top-k, then
top-p on the renormalised survivors, then a draw from what is left.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch


def filtered_probs(logp: torch.Tensor, top_p: float = 1.0, top_k: int = -1) -> torch.Tensor:
    """The distribution a token is drawn from: softmax restricted to top-k, then to top-p.

    logp: (B, V) log-probabilities. Returns (B, V) probabilities summing to 1 per row.
    top-k keeps every token whose probability ties the k-th; top-p keeps the most likely tokens
    until the mass *before* a token reaches top_p (transformers' rule: at least one survives).
    """
    probs = logp.exp()  # (B, V)
    vocab = probs.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(probs, top_k, dim=-1).values[:, -1:]  # (B, 1)
        probs = probs.masked_fill(probs < kth, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = -1,
    generator: torch.Generator | None = None,
    suppress: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` (B, V); temperature <= 0 is greedy.

    Returns tokens (B,) long and their log-probabilities (B,) float32 under
    log_softmax(logits / temperature) (temperature 1 when greedy), suppressed ids masked.
    """
    greedy = temperature <= 0
    scaled = logits.to(torch.float32, copy=True)  # (B, V)
    if not greedy and temperature != 1.0:
        scaled.div_(temperature)
    if suppress is not None and suppress.numel():
        scaled.index_fill_(-1, suppress, torch.finfo(torch.float32).min)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
    if greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        probs = logp.exp() if (top_p >= 1.0 and top_k <= 0) else filtered_probs(logp, top_p, top_k)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i, with no
        # cumulative sum or host sync (the same trick as torch.multinomial's GPU path).
        noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
        tokens = (probs / noise).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class Sampler:
    """Sampling for one generate call: its parameters, the suppressed ids and its random stream.

    With a `kernel` (the fused Triton sampler: one pass over the logits, no (B, V) float32
    temporaries) plain temperature sampling and greedy use it; top-p / top-k use `sample`. A seed
    makes either reproducible.
    """

    def __init__(
        self, params, device: torch.device, suppress: torch.Tensor | None, kernel: Callable | None = None
    ):
        self.params = params
        self.suppress = suppress if suppress is not None and suppress.numel() else None
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        plain = params.top_p >= 1.0 and params.top_k <= 0
        self.kernel = kernel if plain else None
        self.seeds = random.Random(params.seed if params.seed is not None else random.getrandbits(62))

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B,) and their log-probabilities (B,) for logits (B, V); the logits may be
        modified in place (suppressed ids set to -inf)."""
        p = self.params
        if self.kernel is None:
            return sample(logits, p.temperature, p.top_p, p.top_k, self.generator, self.suppress)
        if self.suppress is not None:
            logits.index_fill_(-1, self.suppress, float("-inf"))
        return self.kernel(logits, p.temperature, self.seeds.getrandbits(31))

"""Next-token sampling on the GPU, without host syncs.

    tokens, logprobs = sample(logits, temperature=1.0, top_p=0.9, top_k=50, keys=draw_keys(seed, ids, t))

Each row's random draw is a function of its key alone, and a key is a hash of (seed, the sample's
id in the global batch, the index of the token being drawn): a sample draws the same tokens
however the batch is split over ranks, generate calls or engine rows (given the same logits).

The returned log-probability is that of the distribution the token was drawn from: with plain
temperature sampling log_softmax(logits / temperature) over the full vocabulary (suppressed ids
masked), exactly what the trainer computes; with top-k / top-p the filtered, renormalised
distribution (so TIS and rollout/train_kl see the truncation). Sampling itself follows
transformers' warpers: temperature, then top-k, then top-p on the renormalised survivors, then a
draw from what is left.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea & Flood 2014) on uint64 arrays (wrapping)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def draw_keys(seed: int, sample_ids, token_index) -> torch.Tensor:
    """(B,) int64 keys, one per row: a hash of (seed, sample_ids[b], token_index[b]).

    sample_ids: each row's sample id in the global batch (prompt position x n + sample);
    token_index: the index of the token being drawn (0 for the first). Rows with equal triples
    get equal keys, so equal logits give equal draws whatever the batching."""
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    index = np.asarray(token_index, dtype=np.int64).astype(np.uint64)
    base = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64))
    with np.errstate(over="ignore"):
        keys = _splitmix64(_splitmix64(base ^ _splitmix64(ids)) + index)
    return torch.from_numpy(keys.view(np.int64).copy())


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (logical shifts, wrapping multiplies)."""
    x = x + _signed(_GOLDEN)
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _signed(0x94D049BB133111EB)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def keyed_uniform(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) float32 uniforms in (0, 1): element (b, i) a hash of (keys[b], i), 24 bits each."""
    columns = torch.arange(vocab, device=keys.device, dtype=torch.int64) * _signed(_GOLDEN)
    x = _mix64(keys.to(torch.int64)[:, None] ^ columns[None, :])  # (B, V)
    return ((x >> 40) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0**-24)


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
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` (B, V); temperature <= 0 is greedy.

    keys: (B,) int64 per-row keys (`draw_keys`): row b's noise depends on keys[b] only. Without
    keys the noise comes from `generator` (and then depends on the batch's layout).
    Returns tokens (B,) long and their log-probabilities (B,) float32 under the distribution they
    were drawn from: log_softmax(logits / temperature) (temperature 1 when greedy), suppressed ids
    masked, renormalised over the top-k / top-p survivors when those are set.
    """
    greedy = temperature <= 0
    scaled = logits.to(torch.float32, copy=True)  # (B, V)
    if not greedy and temperature != 1.0:
        scaled.div_(temperature)
    if suppress is not None and suppress.numel():
        scaled.index_fill_(-1, suppress, torch.finfo(torch.float32).min)
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
    filtered = not greedy and (top_p < 1.0 or top_k > 0)
    if greedy:
        tokens = scaled.argmax(dim=-1)
    else:
        probs = filtered_probs(logp, top_p, top_k) if filtered else logp.exp()
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i, with no
        # cumulative sum or host sync (the same trick as torch.multinomial's GPU path).
        if keys is not None:
            noise = keyed_uniform(keys.to(probs.device), probs.shape[-1]).log_().neg_()
        else:
            noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
        tokens = (probs / noise).argmax(dim=-1)
    if filtered:  # the probability the token was drawn with (renormalised over the survivors)
        return tokens, probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).clamp_min(1e-38).log()
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class Sampler:
    """Sampling for one generate call: its parameters, the suppressed ids and its random stream.

    With a `kernel` (the fused Triton sampler: one pass over the logits, no (B, V) float32
    temporaries) plain temperature sampling and greedy use it; top-p / top-k use `sample`. Each
    row's draw is keyed by (seed, its sample's global id, its token index) (`draw_keys`), so a
    seed makes the draws reproducible and independent of how samples are batched; without a seed
    the call draws one at random.
    """

    def __init__(
        self, params, device: torch.device, suppress: torch.Tensor | None, kernel: Callable | None = None,
        positions=None,
    ):
        self.params = params
        # the global batch position of each prompt of the call (seq id s is sample s % n of prompt s // n)
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        self.device = device
        self.suppress = suppress if suppress is not None and suppress.numel() else None
        self.seed = params.seed if params.seed is not None else random.getrandbits(62)
        plain = params.top_p >= 1.0 and params.top_k <= 0
        self.kernel = kernel if plain else None

    def __call__(self, logits: torch.Tensor, seq_ids, token_index) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B,) and their log-probabilities (B,) for logits (B, V); seq_ids / token_index:
        (B,) each row's sequence id in this call (prompt index x n + sample) and the index of the
        token drawn now. The logits may be modified in place (suppressed ids set to -inf)."""
        p = self.params
        keys = None
        if p.temperature > 0:
            ids = np.asarray(seq_ids, dtype=np.int64)
            if self.positions is not None:  # the sample's id in the global batch
                ids = self.positions[ids // p.n] * p.n + ids % p.n
            keys = draw_keys(self.seed, ids, token_index).to(self.device, non_blocking=True)
        if self.kernel is None:
            return sample(logits, p.temperature, p.top_p, p.top_k, suppress=self.suppress, keys=keys)
        if self.suppress is not None:
            logits.index_fill_(-1, self.suppress, float("-inf"))
        if keys is None:
            keys = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
        return self.kernel(logits, p.temperature, keys)

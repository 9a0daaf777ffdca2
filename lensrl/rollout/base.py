"""The rollout interface: prompts in, `n` completions per prompt out.

Every backend (`hf`: transformers generate; `engine`: lensrl's own) returns the same thing, so
trainers never know which one ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from lensrl.models.processor import ProcessedSample


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_new_tokens: int = 64
    ignore_eos: bool = False  # benchmarks force a fixed length
    seed: int | None = None


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]  # generated tokens, including the stop token when one was produced
    logprobs: list[float]  # log p(token) under the sampling distribution's logits / temperature
    finish_reason: str  # "stop" (EOS / stop token) or "length" (max_new_tokens reached)
    text: str = ""
    # MoE with the engine recording routing: (len(token_ids) - 1, MoE layers, top-k) int16, the
    # experts each decode step chose for response tokens 0..R-2 (EngineRollout.routed_experts)
    routed_experts: np.ndarray | None = None


class RolloutBackend(Protocol):
    def generate(
        self, prompts: list[ProcessedSample], params: SamplingParams, positions: list[int] | None = None
    ) -> list[list[Completion]]:
        """Return `params.n` completions for each prompt, in prompt order. `positions`: each
        prompt's position in the global batch (default 0, 1, ...). With `params.seed`, token t of
        sample j of the prompt at position p is drawn from the random stream of (seed, p * n + j,
        t) (`engine.sampler.draw_keys`), so the split into calls or ranks changes no draw."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the backend sample from `model`'s current weights."""
        ...

"""The `hf` rollout backend: transformers `generate` on the policy itself. Slow, simple, the
reference the engine is checked against.

With a seed (`rollout.seed`), tokens are drawn by the engine's keyed sampler
(`lensrl.rollout.engine.sampler.sample`), run as the last logits processor of a greedy `generate`:
token t of sample j of the prompt at global position p is drawn with the random stream of
(seed, p x n + j, t), so what is sampled does not depend on the batch size, the split over ranks or
the other prompts of a call (given the same logits), exactly as with the engine. Without a seed,
transformers samples as it always has (torch's random stream, `do_sample=True`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from lensrl.models.processor import ProcessedSample
from lensrl.models.rope import mm_token_type_ids
from lensrl.rollout.base import Completion, SamplingParams
from lensrl.train.logprobs import mask_suppressed
from lensrl.train.sequences import image_inputs


class HFRollout:
    """Rollout through transformers `generate`; `batch_size`: sequences (prompts x n) per call.
    `on_progress`, when set: called with the number of sequences each call finished."""

    on_progress: Callable[[int], None] | None = None

    def __init__(self, model: torch.nn.Module, processor, batch_size: int = 64):
        self.model = model
        self.processor = processor
        self.batch_size = batch_size

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.model = model  # generate runs on the trainer's own module: nothing to copy

    @torch.no_grad()
    def generate(
        self, prompts: list[ProcessedSample], params: SamplingParams, positions: list[int] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions for each prompt, in prompt order.

        positions: each prompt's position in the global batch (default 0, 1, ...). Sample j of the
        prompt at position p draws token t from the random stream of (seed, p * n + j, t) (the
        engine's `draw_keys`), so with `params.seed` set the samples do not depend on
        `batch_size`, on how the prompts are split over ranks or calls, or on the other prompts of
        a call: only on the logits, which batching changes by rounding at most (padding, kernel
        choice; enough under bf16 to flip an occasional draw).
        Without a seed, transformers' own sampling draws from torch's random stream (seeded per
        rank by trainer.seed and restored on resume).
        Prompts go through `generate` up to `batch_size // n` at a time (at least one)."""
        per_call = max(1, self.batch_size // max(params.n, 1))
        positions = list(range(len(prompts))) if positions is None else [int(p) for p in positions]
        if len(positions) != len(prompts):
            raise ValueError(f"{len(positions)} positions for {len(prompts)} prompts")
        seed = params.seed
        was_training = self.model.training
        self.model.eval()  # transformers turns the KV cache off in training mode with gradient checkpointing
        try:
            results: list[list[Completion]] = []
            for start in range(0, len(prompts), per_call):
                end = start + per_call
                results += self._generate_chunk(prompts[start:end], params, start, positions[start:end], seed)
                if self.on_progress is not None:
                    self.on_progress(len(prompts[start:end]) * params.n)
            return results
        finally:
            self.model.train(was_training)

    def _generate_chunk(self, prompts: list[ProcessedSample], params: SamplingParams, offset: int,
                        positions: list[int], seed: int | None):
        device = next(self.model.parameters()).device
        pad_id = self.processor.pad_token_id
        eos_ids = set(self.processor.eos_token_ids)
        # Left-pad so every row's last prompt token sits at the same column; repeat each prompt n times.
        rows = [p for p in prompts for _ in range(params.n)]
        max_len = max(p.input_ids.shape[0] for p in rows)
        input_ids = torch.full((len(rows), max_len), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(rows):
            length = p.input_ids.shape[0]
            input_ids[i, max_len - length :] = p.input_ids
            attention_mask[i, max_len - length :] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                  # transformers 5.x computes multimodal rope positions only when told where images are
                  "mm_token_type_ids": mm_token_type_ids(input_ids, self.processor.image_token_id).to(device)}
        inputs.update({k: v.to(device) for k, v in image_inputs(rows).items()})
        greedy = params.temperature <= 0
        processors = LogitsProcessorList()
        sampling = {}
        if not greedy and seed is not None:  # transformers decodes greedily; the keyed draw leaves one token
            sample_ids = [p * params.n + j for p in positions for j in range(params.n)]
            processors.append(KeyedSampling(params, seed, sample_ids, max_len))
        elif not greedy:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p,
                        "top_k": params.top_k if params.top_k > 0 else 0}
        with neutral_generation_config(self.model):
            out = self.model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.max_new_tokens if params.ignore_eos else 0,
                **({"do_sample": False} | sampling),
                logits_processor=processors,
                eos_token_id=list(eos_ids),
                pad_token_id=pad_id,
                suppress_tokens=self.processor.suppress_token_ids,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new_tokens = out.sequences[:, max_len:]  # (rows, steps)
        # Log-probabilities of the distribution each token was drawn from: the raw logits at the
        # sampling temperature (what the trainer's forward computes), renormalised over the
        # top-k / top-p survivors when those are set (rollout.top_p's comment says why).
        temperature = params.temperature if not greedy else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temperature  # (rows, steps, V)
        logits = mask_suppressed(logits, torch.tensor(self.processor.suppress_token_ids, device=logits.device))
        logps = behaviour_logprobs(torch.log_softmax(logits, dim=-1), new_tokens, params)  # (rows, steps)
        results: list[list[Completion]] = [[] for _ in prompts]
        for i in range(len(rows)):
            tokens, finish = [], "length"
            for t in new_tokens[i].tolist():
                tokens.append(t)
                if t in eos_ids and not params.ignore_eos:
                    finish = "stop"
                    break
            logprobs = logps[i, : len(tokens)].tolist()
            results[i // params.n].append(
                Completion(offset + i // params.n, tokens, logprobs, finish, self.processor.decode(tokens))
            )
        return results


class KeyedSampling(LogitsProcessor):
    """The draw itself, as transformers' last logits processor of a greedy `generate`: each row's
    token is drawn from the processed scores (suppressed ids and min-length EOS masks applied)
    by `sampler.sample` with the row's key (seed, its sample's global id, the token index), and
    every other score set to -inf, so the argmax picks it.

    sample_ids: each row's sample id in the global batch (prompt position x n + sample);
    prompt_width: the (left-padded) prompt columns, so a row's token index is the number of
    columns after them."""

    def __init__(self, params: SamplingParams, seed: int, sample_ids: list[int], prompt_width: int):
        self.params = params
        self.seed = seed
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from lensrl.rollout.engine.sampler import draw_keys, sample

        p = self.params
        index = np.full(len(self.sample_ids), input_ids.shape[1] - self.prompt_width, dtype=np.int64)
        keys = draw_keys(self.seed, self.sample_ids, index).to(scores.device)
        tokens, _ = sample(scores, p.temperature, p.top_p, p.top_k, keys=keys)  # (rows,)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, tokens.unsqueeze(-1), 0.0)


@contextmanager
def neutral_generation_config(model: torch.nn.Module):
    """transformers' generate fills every setting a call leaves unset from `model.generation_config`,
    the folder's generation_config.json (Qwen2.5-VL-Instruct ships repetition_penalty 1.05): it would
    sample another distribution than the one whose log-probabilities the trainer computes. During
    the call the model carries a config of transformers' neutral defaults instead."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def behaviour_logprobs(logp: torch.Tensor, tokens: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-probability of each drawn token under the distribution it was drawn from.

    logp: (..., V) log_softmax at the sampling temperature; tokens: (...) long. With top_p = 1 and
    top_k <= 0 that is logp itself; otherwise the top-k / top-p filtered distribution, renormalised
    (`sampler.filtered_probs`, transformers' warper order)."""
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if params.temperature <= 0 or (params.top_p >= 1.0 and params.top_k <= 0):
        return picked
    from lensrl.rollout.engine.sampler import filtered_probs

    flat = logp.reshape(-1, logp.shape[-1])
    probs = filtered_probs(flat, params.top_p, params.top_k).reshape(logp.shape)
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).clamp_min(1e-38).log()

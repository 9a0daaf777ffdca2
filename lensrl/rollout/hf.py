"""The `hf` rollout backend: transformers `generate` on the policy itself. Slow, simple, the
reference the engine is checked against."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from lensrl.models.processor import ProcessedSample
from lensrl.models.rope import mm_token_type_ids
from lensrl.rollout.base import Completion, SamplingParams
from lensrl.train.logprobs import mask_suppressed
from lensrl.train.sequences import image_inputs


class HFRollout:
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
        """positions: each prompt's position in the global batch (default 0, 1, ...). With a seed,
        each chunk of prompts is seeded by (seed, its first global position), chunks aligned to
        global positions, so a prompt's samples do not depend on how the batch was split over
        ranks (when the per-call chunk divides each rank's runs of consecutive positions).
        transformers draws from one stream per call, so unlike the engine the draws of a chunk
        depend on its other prompts."""
        # Each call of generate takes up to batch_size sequences (prompts x n).
        per_call = max(1, self.batch_size // max(params.n, 1))
        positions = list(range(len(prompts))) if positions is None else list(positions)
        was_training = self.model.training
        self.model.eval()  # transformers turns the KV cache off in training mode with gradient checkpointing
        generator_state = None
        if params.seed is not None:
            generator_state = torch.random.get_rng_state()
        try:
            results: list[list[Completion]] = []
            start = 0
            while start < len(prompts):
                end = start + 1  # a chunk: consecutive positions inside one aligned window of per_call
                while (end < len(prompts) and end - start < per_call and positions[end] == positions[end - 1] + 1
                       and positions[end] % per_call):
                    end += 1
                if params.seed is not None:
                    torch.manual_seed(params.seed * 1_000_003 + positions[start])
                results += self._generate_chunk(prompts[start:end], params, start)
                start = end
            return results
        finally:
            self.model.train(was_training)
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)

    def _generate_chunk(self, prompts: list[ProcessedSample], params: SamplingParams, offset: int):
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
        sampling = {}
        if not greedy:
            sampling = {"temperature": params.temperature, "top_p": params.top_p,
                        "top_k": params.top_k if params.top_k > 0 else 0}
        with neutral_generation_config(self.model):
            out = self.model.generate(
                **inputs,
                max_new_tokens=params.max_new_tokens,
                min_new_tokens=params.max_new_tokens if params.ignore_eos else 0,
                do_sample=not greedy,
                eos_token_id=list(eos_ids),
                pad_token_id=pad_id,
                suppress_tokens=self.processor.suppress_token_ids,
                output_logits=True,
                return_dict_in_generate=True,
                **sampling,
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

"""The `hf` rollout backend: transformers `generate` on the policy itself. Slow, simple, the
reference the engine is checked against."""

from __future__ import annotations

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
        # Log-probabilities under the raw logits at the sampling temperature (no top-p/top-k
        # renormalisation), the same quantity the trainer's forward computes.
        temperature = params.temperature if not greedy else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temperature  # (rows, steps, V)
        logits = mask_suppressed(logits, torch.tensor(self.processor.suppress_token_ids, device=logits.device))
        logps = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
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

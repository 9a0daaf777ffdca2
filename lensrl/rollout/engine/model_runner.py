"""Runs the model for the engine: prefill through transformers, decode through its own path.

Prefill (once per prompt group) is the policy's own `model.model(...)` forward, vision tower and
deepstack included, on right-padded batches of prompts: the prompt's hidden states are exactly
the trainer's. Its keys/values are copied from transformers' cache into the paged KV cache.

Decode (every step, all running sequences at once) is this file's `_step`: embedding, per layer
RMSNorm -> fused qkv matmul -> q/k norm + rotary + cache write -> paged attention -> o_proj ->
RMSNorm -> MLP, then the LM head; every weight is read once per step for the whole batch. In a
mixture-of-experts layer the MLP is the router's top-k and the experts as grouped GEMMs
(moe.py: `torch._grouped_mm` on CUDA where it passes a self-check, gathered `bmm` otherwise);
with capture_routing each step also writes the experts it chose into a static buffer,
`routed` (num_moe_layers, rows, K), read by the engine after the step.
After the prompt every position is a text position (T + rope_delta + j on all three M-RoPE
axes), so the rotary embedding is a plain 1D one. On CUDA each batch size bucket is captured
once in a CUDA graph; the inputs live in static buffers, one row per running sequence:

    input_ids (B,)  positions (B,)  cache_lens (B,)  active (B,)  block_tables (B, max_blocks)

Rows past the running count are padding: inactive, length 0, block table of the scratch block.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lensrl.models.load import language_model
from lensrl.rollout.engine import moe
from lensrl.rollout.engine import ops as torch_ops
from lensrl.rollout.engine.kv_cache import KVCache, KVLayout
from lensrl.rollout.engine.scheduler import Group, Seq
from lensrl.rollout.engine.weights import DecodeWeights, TextShape
from lensrl.train.packing import pack_sequences
from lensrl.train.sequences import image_inputs


def graph_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes captured as CUDA graphs: 1, 2, 3, 4, 6, 8, 12, ... (x1.5 steps), then max."""
    sizes, size = [1, 2, 3], 4
    while size < max_num_seqs:
        sizes += [size, size * 3 // 2]
        size *= 2
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class ModelRunner:
    def __init__(
        self,
        shape: TextShape,
        device: torch.device,
        max_num_seqs: int,
        use_cuda_graphs: bool = True,
        use_triton: bool | None = None,
        use_grouped_mm: bool | None = None,
        capture_routing: bool = False,
    ):
        self.shape = shape
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.use_cuda_graphs = use_cuda_graphs and device.type == "cuda"
        self.use_triton = use_triton
        self.use_grouped_mm = use_grouped_mm
        self.ops = torch_ops
        self.experts = moe.gathered_experts  # the experts implementation (_select_ops)
        self.capture_routing = capture_routing and shape.num_moe_layers > 0
        self.routed: torch.Tensor | None = None  # (num_moe_layers, max_num_seqs, K) int16 when capturing
        self.weights: DecodeWeights | None = None
        self.kv: KVCache | None = None
        self.num_rows = 0
        self.buckets = graph_buckets(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_pool = None
        self.capture_s = 0.0
        self.num_captures = 0
        self.cos_table: torch.Tensor | None = None
        self.sin_table: torch.Tensor | None = None
        self.block_tables: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # (max_num_seqs, V) the decode step's output buffer
        self._graph_kv_key = None

    # ------------------------------------------------------------------ weights and memory

    def set_weights(self, weights: DecodeWeights) -> None:
        self.weights = weights
        self.invalidate_graphs()
        self.cos_table = None  # the rope table's dtype follows the residual stream's
        self._select_ops()

    def invalidate_graphs(self) -> None:
        self.graphs.clear()
        self.graph_pool = None

    def wake(self, layout: KVLayout, num_blocks: int, max_blocks_per_seq: int, max_position: int) -> None:
        """Allocate the KV pool (and, the first time, the static decode buffers) for a generate call.

        Captured graphs survive a sleep/wake cycle when the pool comes back at the same address
        (PyTorch's allocator usually hands the same cached segment back for the same size);
        otherwise they are recaptured lazily.
        """
        self.layout = layout
        if self.kv is None or self.kv.num_blocks != num_blocks or self.kv.layout != layout:
            self.kv = None
            self.kv = KVCache(layout, num_blocks, self.device)
        key = (self.kv.data.data_ptr(), num_blocks, layout)
        if key != self._graph_kv_key:
            self.invalidate_graphs()
            self._graph_kv_key = key
        if self.block_tables is None or self.block_tables.shape[1] < max_blocks_per_seq:
            self.invalidate_graphs()
            rows, device = self.max_num_seqs, self.device
            self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
            self.positions = torch.zeros(rows, dtype=torch.long, device=device)
            self.cache_lens = torch.zeros(rows, dtype=torch.int32, device=device)
            self.active = torch.zeros(rows, dtype=torch.int32, device=device)
            self.block_tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, device=device)
        if self.logits is None or self.logits.dtype != self.weights.matmul_dtype:
            self.invalidate_graphs()
            self.logits = torch.empty(
                self.max_num_seqs, self.shape.vocab_size, dtype=self.weights.matmul_dtype, device=self.device
            )
        if self.capture_routing and self.routed is None:
            self.invalidate_graphs()
            size = (self.shape.num_moe_layers, self.max_num_seqs, self.shape.num_experts_per_tok)
            self.routed = torch.zeros(size, dtype=torch.int16, device=self.device)
        self._reset_rows(0, self.max_num_seqs)
        self.num_rows = 0
        self._ensure_rope_table(max_position)

    def sleep(self, free_all: bool = False) -> None:
        """Drop the KV pool. free_all: also the graphs and the static buffers (~logits of
        max_num_seqs rows), which otherwise stay for the next call."""
        self.kv = None
        self.num_rows = 0
        if free_all:
            self.invalidate_graphs()
            self._graph_kv_key = None
            self.block_tables = self.logits = self.routed = None

    def _ensure_rope_table(self, max_position: int) -> None:
        w = self.weights
        if self.cos_table is not None and self.cos_table.shape[0] >= max_position:
            return
        self.invalidate_graphs()
        size = max(4096, 1 << math.ceil(math.log2(max(max_position, 2))))
        # transformers: freqs = position.float() * inv_freq (fp32), cos() * scaling, cast to the
        # hidden states' dtype
        positions = torch.arange(size, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * w.inv_freq.to(self.device)[None, :]  # (P, D / 2)
        self.cos_table = (freqs.cos() * w.rope_scaling).to(w.residual_dtype).contiguous()
        self.sin_table = (freqs.sin() * w.rope_scaling).to(w.residual_dtype).contiguous()

    # ------------------------------------------------------------------ prefill

    def prefill(self, model: torch.nn.Module, groups: Sequence[Group], token_budget: int) -> torch.Tensor:
        """Prefill each group's prompt into its prompt blocks; returns the logits of each prompt's
        last token (G, V) in the model's output dtype. Runs under the caller's autocast."""
        packed = _packs(model)
        order = sorted(range(len(groups)), key=lambda i: -groups[i].prompt_len)
        logits: list[torch.Tensor | None] = [None] * len(groups)
        chunk: list[int] = []
        run = self._prefill_packed if packed else self._prefill_chunk
        for i in order:  # longest first, so each (padded) chunk pads little
            size = sum(groups[j].prompt_len for j in chunk) + groups[i].prompt_len if packed else (
                (len(chunk) + 1) * groups[chunk[0]].prompt_len if chunk else 0)
            if chunk and size > token_budget:
                run(model, [groups[j] for j in chunk], chunk, logits)
                chunk = []
            chunk.append(i)
        if chunk:
            run(model, [groups[j] for j in chunk], chunk, logits)
        return torch.stack(logits)  # type: ignore[arg-type]

    def _prefill_packed(self, model, groups: list[Group], where: list[int], out: list) -> None:
        """The prompts back to back in one row, attention kept inside each (varlen FlashAttention on
        CUDA, lensrl.train.attention), each with its own multimodal rope positions: no padding.
        No KV cache object: each text attention call writes its keys and values straight into
        the paged pool (`kv_sink`), so the decoder layers run as they do in training (compiled,
        when model.compile is on) and nothing is copied afterwards."""
        from lensrl.train.attention import kv_sink

        layout = self.layout
        block_size = layout.block_size
        lengths = [g.prompt_len for g in groups]
        slots = torch.cat([torch.tensor(g.prompt_blocks)[torch.arange(n) // block_size] * block_size
                           + torch.arange(n) % block_size for g, n in zip(groups, lengths)]).to(self.device)
        layer_of = {layer.self_attn: i for i, layer in enumerate(language_model(model).layers)}
        written = set()

        def store(module, key, value):  # key, value: (1, KVH, T, D)
            layer = layer_of.get(module)
            if layer is None:  # the vision tower's attention
                return
            self._write_kv(layer, key[0].transpose(0, 1), value[0].transpose(0, 1), slots)
            written.add(layer)

        with kv_sink(store):
            output = model.model(**pack_sequences([g.prompt for g in groups], self.device), use_cache=False)
        if len(written) != layout.num_layers:
            raise RuntimeError(f"prefill wrote the KV of {len(written)} of {layout.num_layers} layers: the "
                               "text attention did not run through lensrl.train.attention")
        last = torch.tensor(lengths).cumsum(0).to(self.device) - 1
        self._first_logits(model, output.last_hidden_state[0, last], where, out)

    def _store_prompt_kv(self, past_key_values, slots: torch.Tensor, tokens) -> None:
        """Copy a transformers cache's keys and values into the paged pool. `tokens` maps a layer's
        (B, KVH, T, D) states to (N, KVH, D), one row per entry of `slots`."""
        for layer in range(self.layout.num_layers):
            keys, values = _cache_layer(past_key_values, layer)
            self._write_kv(layer, tokens(keys), tokens(values), slots)

    def _write_kv(self, layer: int, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
        """One layer's keys and values (N, KVH, D) into the pool's flat token slots (N,)."""
        layout = self.layout
        for cache, states in ((self.kv.keys(layer), keys), (self.kv.values(layer), values)):
            cache.view(-1, layout.num_kv_heads, layout.head_dim).index_copy_(0, slots, states.to(layout.dtype))

    @staticmethod
    def _first_logits(model, hidden: torch.Tensor, where: list[int], out: list) -> None:
        """Logits of each prompt's last state (G, H) into out[where[g]]."""
        logits = F.linear(hidden, model.lm_head.weight, model.lm_head.bias)  # (G, V)
        for row, i in enumerate(where):
            out[i] = logits[row]

    def _prefill_chunk(self, model, groups: list[Group], where: list[int], out: list) -> None:
        device, block_size = self.device, self.layout.block_size
        lengths = [g.prompt_len for g in groups]
        batch, width = len(groups), max(lengths)
        input_ids = torch.zeros(batch, width, dtype=torch.long)
        position_ids = torch.ones(3, batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        slots = torch.zeros(batch, width, dtype=torch.long)
        for row, g in enumerate(groups):
            length = g.prompt_len
            input_ids[row, :length] = g.prompt.input_ids
            position_ids[:, row, :length] = g.prompt.position_ids
            valid[row, :length] = True
            t = torch.arange(length)
            slots[row, :length] = torch.tensor(g.prompt_blocks)[t // block_size] * block_size + t % block_size
        inputs = {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device)}
        if min(lengths) != width:
            inputs["attention_mask"] = valid.long().to(device)
        inputs.update({k: v.to(device) for k, v in image_inputs([g.prompt for g in groups]).items()})
        output = model.model(**inputs, use_cache=True)
        valid_d = valid.to(device)
        slots_d = slots.to(device)[valid_d]  # (N,) in row-major order, as boolean indexing takes them
        self._store_prompt_kv(output.past_key_values, slots_d, lambda s: s.transpose(1, 2)[valid_d])
        last = torch.tensor(lengths, device=device) - 1
        self._first_logits(model, output.last_hidden_state[torch.arange(batch, device=device), last], where, out)

    # ------------------------------------------------------------------ rows

    def add_rows(self, seqs: list[Seq]) -> None:
        """Append running sequences as rows; copy each one's share of the prompt's last block."""
        start, count = self.num_rows, len(seqs)
        assert start + count <= self.max_num_seqs
        block_size = self.layout.block_size
        src, dst = [], []
        tables = torch.zeros(count, self.block_tables.shape[1], dtype=torch.int32)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
            prompt_len = seq.group.prompt_len
            if prompt_len % block_size:
                src.append(seq.group.prompt_blocks[prompt_len // block_size])
                dst.append(seq.own_blocks[0])
        self.kv.copy_blocks(src, dst)
        rows = slice(start, start + count)
        self.input_ids[rows].copy_(torch.tensor([s.first_token for s in seqs]))
        self.positions[rows].copy_(torch.tensor([s.next_position for s in seqs]))
        self.cache_lens[rows].copy_(torch.tensor([s.num_cached for s in seqs], dtype=torch.int32))
        self.active[rows].fill_(1)
        self.block_tables[rows].copy_(tables)
        self.num_rows += count

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in order), moved to the front; the rest become padding."""
        old = self.num_rows
        if len(keep) == old:
            return
        if keep and keep != list(range(len(keep))):
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            for buffer in (self.input_ids, self.positions, self.cache_lens, self.active, self.block_tables):
                buffer[: len(keep)] = buffer[index]
        self._reset_rows(len(keep), old)
        self.num_rows = len(keep)

    def set_next_tokens(self, tokens: torch.Tensor) -> None:
        self.input_ids[: tokens.shape[0]].copy_(tokens)

    def _reset_rows(self, start: int, end: int) -> None:
        if end <= start:
            return
        for buffer in (self.input_ids, self.positions, self.cache_lens, self.active, self.block_tables):
            buffer[start:end] = 0

    # ------------------------------------------------------------------ decode

    def decode(self) -> torch.Tensor:
        """One decode step for all running rows: (num_rows, V) logits in the matmul dtype."""
        n = self.num_rows
        if not self.use_cuda_graphs:
            return self._step(n)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self.graphs:
            self._capture(bucket)
        self.graphs[bucket].replay()
        return self.logits[:n]

    def _capture(self, bucket: int) -> None:
        start = time.perf_counter()
        self._warm_up(bucket)
        self.graphs[bucket] = self._record(bucket)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start
        self.num_captures += 1

    def _warm_up(self, bucket: int) -> None:
        """Run the step once before capturing it (compiles kernels, sets up cuBLAS). It runs on
        the real rows: it writes the same KV the replay will write; lengths are restored."""
        saved = (self.cache_lens.clone(), self.positions.clone())
        if self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
        else:
            self._step(bucket)
        self.cache_lens.copy_(saved[0])
        self.positions.copy_(saved[1])

    def _record(self, bucket: int):
        """A CUDA graph of one decode step over the first `bucket` rows."""
        if self.graph_pool is None:
            self.graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):  # records only: nothing runs here
            self._step(bucket)
        return graph

    def _step(self, batch: int) -> torch.Tensor:
        w, s, ops, kv = self.weights, self.shape, self.ops, self.kv
        mm = w.matmul_dtype
        eps = s.rms_norm_eps
        block_size = self.layout.block_size
        positions = self.positions[:batch]
        cache_lens = self.cache_lens[:batch]
        tables = self.block_tables[:batch]
        active = self.active[:batch]
        # where this step's token goes, and how many tokens each row attends to
        block = tables.gather(1, (cache_lens // block_size).long().unsqueeze(1)).squeeze(1).long()
        slots = block * block_size + (cache_lens % block_size).long()  # (B,)
        context = cache_lens + 1  # (B,) int32
        scale = s.head_dim**-0.5
        x = F.embedding(self.input_ids[:batch], w.embed)  # (B, H) the residual stream, trainer's dtype
        delta = None
        moe_layer = 0
        for i, layer in enumerate(w.layers):
            h = ops.rms_norm(x, layer.input_norm, eps, mm, delta)  # (B, H)
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)  # (B, (NH + 2 KVH) * D)
            q = ops.rope_and_cache(
                qkv,
                layer.q_norm,
                layer.k_norm,
                eps,
                self.cos_table,
                self.sin_table,
                positions,
                kv.keys(i),
                kv.values(i),
                slots,
                s.num_heads,
                s.num_kv_heads,
            )
            attn = ops.paged_attention(q, kv.keys(i), kv.values(i), tables, context, scale)  # (B, NH, D)
            delta = F.linear(attn.reshape(batch, -1), layer.o_weight, layer.o_bias)  # (B, H)
            if layer.is_moe:
                # the trainer's sparse block gets the norm's output in the residual dtype: the
                # router casts it to the matmul dtype (autocast), the experts to their own
                h = ops.rms_norm(x, layer.post_norm, eps, w.residual_dtype, delta)  # (B, H)
                delta = self._sparse_mlp(h, layer, moe_layer)  # (B, H) residual dtype
                moe_layer += 1
                continue
            h = ops.rms_norm(x, layer.post_norm, eps, mm, delta)
            if layer.gate_up_weight is not None:
                gate_up = F.linear(h, layer.gate_up_weight)  # (B, 2I)
                gate, up = gate_up[:, : s.intermediate_size], gate_up[:, s.intermediate_size :]
            else:
                gate, up = F.linear(h, layer.gate_weight), F.linear(h, layer.up_weight)  # (B, I) each
            delta = F.linear(self._act_mul(gate, up), layer.down_weight)  # (B, H)
        h = ops.rms_norm(x, w.final_norm, eps, mm, delta)
        logits = self.logits[:batch]  # (B, V), a static buffer: graphs of every size share it
        if w.lm_head_bias is None:
            torch.mm(h, w.lm_head.t(), out=logits)
        else:
            logits.copy_(F.linear(h, w.lm_head, w.lm_head_bias))
        cache_lens.add_(active)
        positions.add_(active)
        return logits

    def _sparse_mlp(self, h: torch.Tensor, layer, moe_layer: int) -> torch.Tensor:
        """A mixture-of-experts MLP on h (B, H): route, record the choice when capturing, run the
        chosen experts. Returns (B, H) in h's dtype."""
        weights, experts = moe.route(
            h.to(self.weights.matmul_dtype), layer.router_weight, self.shape.num_experts_per_tok
        )  # (B, K) each
        if self.routed is not None:
            self.routed[moe_layer, : h.shape[0]].copy_(experts)
        return self.experts(h, weights, experts, layer.experts_gate_up, layer.experts_down, self._act_mul)

    def routed_rows(self, count: int) -> torch.Tensor:
        """The experts the last decode step chose for its first `count` rows: (count, L, K) int16
        on the device (L MoE layers). Only with capture_routing."""
        return self.routed[:, :count].transpose(0, 1)

    def _act_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.shape.hidden_act == "silu":
            return self.ops.silu_mul(gate, up)
        from transformers.activations import ACT2FN

        return ACT2FN[self.shape.hidden_act](gate) * up

    # ------------------------------------------------------------------ kernel choice

    def _select_ops(self) -> None:
        """Triton kernels on CUDA when they import and agree with the torch ops on this dtype
        (use_triton=None); use_triton=True takes them unchecked (on CPU: tests under
        TRITON_INTERPRET=1), False never. The same for the experts: grouped_mm where torch has a
        native kernel for it (CUDA, bf16, SM90/SM100) and it agrees with the gathered experts on
        the first MoE layer's weights (use_grouped_mm=None), always (True: also on the CPU,
        where torch has a grouped_mm kernel), or never (False)."""
        self._select_experts()
        self.ops = torch_ops
        if self.use_triton is False or (self.device.type != "cuda" and not self.use_triton):
            return
        try:
            from lensrl.rollout.engine import triton_ops

            if self.use_triton is None:
                torch_ops.check_ops(triton_ops, self.shape, self.weights, self.device)
            self.ops = triton_ops
        except Exception as e:  # noqa: BLE001 (any failure means: use the torch ops)
            if self.use_triton:
                raise
            warnings.warn(
                f"rollout engine: Triton kernels unavailable, using plain torch ops ({e})", stacklevel=2
            )

    def _select_experts(self) -> None:
        self.experts = moe.gathered_experts
        layer = next((layer for layer in self.weights.layers if layer.is_moe), None)
        if layer is None or self.use_grouped_mm is False:
            return
        if self.use_grouped_mm:
            self.experts = moe.grouped_experts
            return
        if not moe.grouped_mm_native(layer.experts_gate_up):
            return
        try:
            moe.check_grouped(layer.experts_gate_up, layer.experts_down, self.shape.num_experts_per_tok)
            self.experts = moe.grouped_experts
        except Exception as e:  # noqa: BLE001 (any failure means: gather the experts)
            warnings.warn(f"rollout engine: grouped_mm experts unavailable, gathering them instead ({e})",
                          stacklevel=2)

    @property
    def experts_kernel(self) -> str:
        return "grouped_mm" if self.experts is moe.grouped_experts else "gathered"

    @property
    def kernels(self) -> str:
        return "triton" if self.ops is not torch_ops else "torch"

    @property
    def sample_kernel(self):
        """The fused sampling kernel when the Triton ops are in use, else None (torch sampler)."""
        return None if self.ops is torch_ops else self.ops.sample


def _cache_layer(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) of one layer of a transformers cache, (B, KVH, T, D) each."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # transformers < 4.56


def _packs(model: torch.nn.Module) -> bool:
    """Whether prefill can run packed: the text model is on lensrl's packed attention."""
    from lensrl.train.attention import TEXT_ATTENTION

    return model.config.get_text_config()._attn_implementation == TEXT_ATTENTION

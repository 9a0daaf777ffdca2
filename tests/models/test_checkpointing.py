"""model.gradient_checkpointing_scope: what recomputes in the backward, and that the gradients are
the same whatever recomputes (a packed forward + backward of the tiny models, fp32, eager)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lensrl.config import ConfigError, GRPOConfig, load_config
from lensrl.models.load import load_policy, model_blocks, set_gradient_checkpointing
from lensrl.train.sequences import forward_response_logprobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_packing import _batch, _loss  # noqa: E402  (the mixed text / multi-image batch)

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def _forward_backward(model, seqs, pad) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Gradients of a GRPO-like loss, and how often the first vision block's and decoder layer's MLP ran."""
    vision, decoder = (blocks[0].mlp for blocks in model_blocks(model))  # inside the checkpointed forward (a pre-hook: the recompute stops early, once it has what the backward needs)
    calls = {"vision": 0, "decoder": 0}
    hooks = [vision.register_forward_pre_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1)),
             decoder.register_forward_pre_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))]
    logp, entropy, mask = forward_response_logprobs(model, seqs, pad, 0.7, 16, with_entropy=True, packed=True)
    _loss(logp, entropy, mask, torch.linspace(-1.0, 1.5, len(seqs)), mask.sum()).backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, calls


@pytest.mark.parametrize("arch_fixture", ["tiny_qwen25_dir", "tiny_qwen3_dir"])
def test_vision_scope_recomputes_only_the_vision_blocks_and_gives_the_same_gradients(request, arch_fixture,
                                                                                   make_image_bytes):
    model, processor = load_policy(request.getfixturevalue(arch_fixture))
    model.train()
    seqs = _batch(processor, make_image_bytes, seed=0)
    plain, plain_calls = _forward_backward(model, seqs, processor.pad_token_id)
    assert plain_calls == {"vision": 1, "decoder": 1}
    for scope, recomputed in (("all", {"vision": 2, "decoder": 2}), ("vision", {"vision": 2, "decoder": 1})):
        set_gradient_checkpointing(model, scope)
        grads, calls = _forward_backward(model, seqs, processor.pad_token_id)
        assert calls == recomputed, scope
        assert grads.keys() == plain.keys() and len(grads) > 20  # text and vision alike
        for name, grad in grads.items():
            torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, scope=scope: f"{scope}, {name}: {m}")
        model.gradient_checkpointing_disable()
    with pytest.raises(ValueError, match="'all' or 'vision'"):
        set_gradient_checkpointing(model, "decoder")


def test_a_scope_without_checkpointing_is_refused():
    with pytest.raises(ConfigError, match="gradient_checkpointing_scope=vision has no effect"):
        load_config(GRPOConfig, overrides=["data.train_files=[x.parquet]", "model.gradient_checkpointing_scope=vision"])
    cfg = load_config(GRPOConfig, overrides=["data.train_files=[x.parquet]", "model.gradient_checkpointing=true",
                                         "model.gradient_checkpointing_scope=vision"])
    assert cfg.model.gradient_checkpointing_scope == "vision"


@pytest.mark.parametrize("scope", ["all", "vision"])
def test_a_frozen_vision_tower_is_neither_recomputed_nor_backpropagated(tiny_qwen25_dir, make_image_bytes, scope):
    """freeze_vision_tower (or LoRA on the language model alone): with checkpointing on, the tower
    runs once and no gradient flows into it (transformers' input-require-grads hook had made every
    backward go through it and recompute it); the language model's gradients are unchanged."""
    model, processor = load_policy(tiny_qwen25_dir)
    model.train()
    model.model.visual.requires_grad_(False)
    seqs = _batch(processor, make_image_bytes, seed=0)
    plain, plain_calls = _forward_backward(model, seqs, processor.pad_token_id)
    set_gradient_checkpointing(model, scope)
    outputs = []
    hook = model.model.visual.register_forward_hook(lambda m, args, out: outputs.append(out))
    grads, calls = _forward_backward(model, seqs, processor.pad_token_id)
    hook.remove()
    assert calls == {"vision": 1, "decoder": 2 if scope == "all" else 1}
    visual_out = outputs[0] if isinstance(outputs[0], torch.Tensor) else outputs[0][0]
    assert not visual_out.requires_grad
    assert grads.keys() == plain.keys() and not any(".visual." in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")

"""`lensrl convert` of a Qwen3-VL-MoE checkpoint: the stacked experts `save_pretrained` writes, or
one gate/up/down Linear per expert (`--expert-layout per_expert`), both equal to the live model."""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lensrl.cli import main as cli_main
from lensrl.models.load import ModelError, load_policy
from lensrl.models.processor import Processor
from lensrl.models.shapes import model_class, shape_config
from lensrl.train import convert as convert_module
from lensrl.train.convert import ConvertError, convert_checkpoint, hf_weight_names, stacked_experts
from tests.train.test_convert import (
    SHARD,
    assert_same_weights,
    load_hf,
    logits,
    make_run,
    safetensors_contents,
)

EXPERTS = ".mlp.experts."


@pytest.fixture(scope="module")
def moe_run(tiny_moe_dir, tmp_path_factory):
    """(live model, checkpoint): a perturbed, one-AdamW-step copy of the tiny MoE model, saved by
    lensrl's save_checkpoint as training saves it."""
    return make_run(tmp_path_factory.mktemp("moe") / "run", tiny_moe_dir)


def text_config(model: torch.nn.Module):
    return model.config.get_text_config()


def assert_close_logits(converted: torch.nn.Module, live: torch.nn.Module, folder: Path) -> None:
    processor = Processor.from_pretrained(folder)
    torch.testing.assert_close(logits(converted, processor), logits(live, processor), atol=1e-5, rtol=0)


@contextmanager
def per_expert_loading():
    """transformers' own per-expert -> stacked load conversion, the one Qwen3-MoE's per-expert folders
    load through (`qwen2_moe`: MergeModulelist(dim=0) of each expert's gate and up, Concatenate(dim=1)
    of the two; MergeModulelist of the downs), added to Qwen3-VL-MoE's mapping while in the block.

    transformers 5 has no per-expert conversion for Qwen3-VL-MoE (its release folders are stacked),
    so this is how plain `from_pretrained` reads the per-expert layout, with transformers' code.
    """
    from transformers import conversion_mapping as mapping

    original = mapping.get_checkpoint_conversion_mapping("qwen3_vl_moe")
    per_expert = mapping.get_checkpoint_conversion_mapping("qwen2_moe")
    mapping.register_checkpoint_conversion_mapping("qwen3_vl_moe", original + per_expert, overwrite=True)
    try:
        yield
    finally:
        mapping.register_checkpoint_conversion_mapping("qwen3_vl_moe", original, overwrite=True)
        mapping.USER_REGISTERED_MAPPINGS.discard("qwen3_vl_moe")


def test_default_is_the_stacked_layout_save_pretrained_writes(moe_run, tmp_path):
    live, ckpt = moe_run
    out = convert_checkpoint(ckpt, tmp_path / "hf", max_shard_size_bytes=SHARD, progress=False)
    written = safetensors_contents(out)
    assert len({file for file, _ in written.values()}) > 3

    # the names, shapes, dtypes and values save_pretrained writes for the same model
    live.save_pretrained(tmp_path / "save_pretrained")
    reference = safetensors_contents(tmp_path / "save_pretrained")
    assert written.keys() == reference.keys()
    for name, (_, tensor) in reference.items():
        assert written[name][1].dtype == tensor.dtype and torch.equal(written[name][1], tensor), name
    text = text_config(live)
    experts, inter, hidden = text.num_experts, text.moe_intermediate_size, text.hidden_size
    assert 2 * inter != hidden  # the tiny model's stacked shapes tell the two orientations apart
    for layer in range(text.num_hidden_layers):
        prefix = f"model.language_model.layers.{layer}{EXPERTS}"
        assert written[prefix + "gate_up_proj"][1].shape == (experts, 2 * inter, hidden)
        assert written[prefix + "down_proj"][1].shape == (experts, hidden, inter)
    assert not any(EXPERTS + "0." in name for name in written)
    assert "lm_head.weight" not in written  # tied

    # plain transformers loads it with nothing missing; it is the live model
    converted = load_hf(out)
    assert_same_weights(converted, live)
    assert_close_logits(converted, live, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl_moe" and config["dtype"] == "float32"


def test_per_expert_layout(moe_run, tmp_path, monkeypatch):
    live, ckpt = moe_run
    loads = []  # what each shard read from the checkpoint
    real_load = dcp.load

    def recording_load(state_dict, **kwargs):
        loads.append({k: tuple(v.shape) for k, v in state_dict["model"].items()})
        return real_load(state_dict, **kwargs)

    monkeypatch.setattr(dcp, "load", recording_load)
    out = convert_checkpoint(ckpt, tmp_path / "hf", max_shard_size_bytes=SHARD, progress=False,
                             expert_layout="per_expert")
    monkeypatch.undo()
    written = safetensors_contents(out)
    state = live.state_dict()
    text = text_config(live)
    inter = text.moe_intermediate_size

    # E x 3 Linear weights per layer, split from the stacked ones (gate rows first), and no stacked names
    per_layer = defaultdict(set)
    for name in written:
        assert not name.endswith(("gate_up_proj", "experts.down_proj")), name
        if EXPERTS in name:
            layer = name.split(EXPERTS)[0]
            per_layer[layer].add(name.split(EXPERTS)[1])
    layers = [f"model.language_model.layers.{i}" for i in range(text.num_hidden_layers)]
    assert sorted(per_layer) == layers
    for layer in layers:
        assert per_layer[layer] == {f"{e}.{proj}.weight" for e in range(text.num_experts)
                                    for proj in ("gate_proj", "up_proj", "down_proj")}
        gate_up, down = state[f"{layer}{EXPERTS}gate_up_proj"], state[f"{layer}{EXPERTS}down_proj"]
        for e in range(text.num_experts):
            expert = f"{layer}{EXPERTS}{e}."
            assert torch.equal(written[expert + "gate_proj.weight"][1], gate_up[e, :inter])
            assert torch.equal(written[expert + "up_proj.weight"][1], gate_up[e, inter:])
            assert torch.equal(written[expert + "down_proj.weight"][1], down[e])
            assert written[expert + "gate_proj.weight"][1].shape == (inter, text.hidden_size)
            assert written[expert + "down_proj.weight"][1].shape == (text.hidden_size, inter)
    # everything else exactly as in the stacked layout
    others = {name for name in written if EXPERTS not in name}
    assert others and all(torch.equal(written[name][1], state[name]) for name in others)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: file for name, (file, _) in written.items()}

    # streaming: every stored tensor read once, whole, by the shard that holds all of its pieces;
    # a shard over the size limit holds the pieces of one stored tensor only
    read = [key for shard in loads for key in shard]
    assert len(read) == len(set(read)) and len(loads) == len({file for file, _ in written.values()})
    for shard in loads:
        assert len(shard) == 1 or sum(torch.Size(s).numel() * 4 for s in shard.values()) <= SHARD
    files_of = defaultdict(set)
    for name, (file, _) in written.items():
        if EXPERTS in name:
            files_of[name.split(EXPERTS)[0] + ("down" if "down_proj" in name else "gate_up")].add(file)
    assert all(len(files) == 1 for files in files_of.values())

    # transformers' own per-expert load conversion makes it the live model again
    with per_expert_loading():
        converted = load_hf(out)
    assert_same_weights(converted, live)
    assert_close_logits(converted, live, out)
    # lensrl itself (eval, training) refuses it by what it is, not as an incomplete folder
    with pytest.raises(ModelError, match=r"stores its experts one per expert .*--expert-layout stacked"):
        load_policy(out)


def test_cli_per_expert_in_bfloat16(moe_run, tmp_path, capsys):
    live, ckpt = moe_run
    out = tmp_path / "per_expert_bf16"
    cli_main(["convert", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "bfloat16",
              "--expert-layout", "per_expert", "--no-progress"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out}" and "per-expert layout" in printed[1] and "--expert-layout stacked" in printed[1]
    written = safetensors_contents(out)
    assert {t.dtype for _, t in written.values()} == {torch.bfloat16}
    down = live.state_dict()["model.language_model.layers.2.mlp.experts.down_proj"]
    assert torch.equal(written["model.language_model.layers.2.mlp.experts.7.down_proj.weight"][1],
                       down[7].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with per_expert_loading():
        converted = load_hf(out, dtype="auto")
    assert converted.dtype == torch.bfloat16
    assert_same_weights(converted, live, torch.bfloat16)


def test_dense_model_refuses_per_expert(tiny_qwen3_dir, tmp_path, capsys):
    ckpt = make_run(tmp_path / "run", tiny_qwen3_dir)[1]
    with pytest.raises(ConvertError, match=r"per_expert: base model .* \(qwen3_vl\) has no mixture-of-experts"):
        convert_checkpoint(ckpt, tmp_path / "out", expert_layout="per_expert", progress=False)
    with pytest.raises(SystemExit) as exit_info:  # the CLI: the same message, exit status 2
        cli_main(["convert", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--expert-layout", "per_expert"])
    assert exit_info.value.code == 2 and "no mixture-of-experts layers" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="unknown expert layout 'grouped'"):
        convert_checkpoint(ckpt, tmp_path / "out", expert_layout="grouped", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp_out").exists()


def test_real_30b_a3b_shape_plans_128_experts_per_layer():
    """Planning only, on the meta device: Qwen3-VL-30B-A3B's 48 layers of 128 experts (I 768, H 2048)
    become 48 x 128 x 3 Linear weights of the per-expert shapes, the same bytes as the stacked ones."""
    with torch.device("meta"):
        model = model_class("qwen3_vl_moe")(shape_config("qwen3_vl_30b_a3b"))
    names = hf_weight_names(model)
    experts = stacked_experts(model)
    assert len(experts) == 2 * 48 and set(experts) <= set(names.values())
    assert "lm_head.weight" in names  # untied in the real model
    state = model.state_dict()
    pieces = []
    for name, fqn in names.items():
        if fqn in experts:
            stacked = convert_module._Tensor(name, fqn, state[fqn].shape, torch.bfloat16, torch.bfloat16)
            pieces += convert_module._expert_pieces(stacked, experts[fqn])
    assert len(pieces) == len({p.name for p in pieces}) == 48 * 128 * 3
    assert {p.name.split(".")[-2]: tuple(p.shape) for p in pieces} == {
        "gate_proj": (768, 2048), "up_proj": (768, 2048), "down_proj": (2048, 768)}
    assert sum(p.nbytes for p in pieces) == sum(state[fqn].numel() * 2 for fqn in experts)
    shards = convert_module._plan_shards(pieces, 100 * 2**20)  # a stacked tensor's pieces never split
    assert len(shards) > 1
    assert len({p.source for p in pieces}) == sum(len({p.source for p in shard}) for shard in shards)

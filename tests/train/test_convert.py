"""`lensrl convert`: a training checkpoint (DCP) to a Hugging Face folder that plain transformers loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoTokenizer

from lensrl.cli import main as cli_main
from lensrl.config import GRPOConfig, save_config
from lensrl.data.sample import ImageSource, Sample
from lensrl.models.processor import Processor
from lensrl.train import convert as convert_module
from lensrl.train.checkpoint import save_checkpoint
from lensrl.train.convert import ConvertError, convert_checkpoint, parse_size
from tests.conftest import make_test_image

REPO = Path(__file__).resolve().parents[2]
SHARD = 300_000  # bytes: a 1m tiny model (~4 MB in fp32) becomes about 15 shards


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight away from the folder on disk (noise plus one AdamW step, so the
    checkpoint also holds optimizer state the converter must leave out)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def _train_state(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = sum((p.float() ** 2).mean() for p in model.parameters())
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler


def make_run(run_dir: Path, model_dir: Path, seed: int = 1, step: int = 2):
    """A run folder with config.yaml (model.path = model_dir) and checkpoints/step_{step} of a
    perturbed, one-step-trained copy of the model; returns (live model, checkpoint path)."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    _perturb(model, seed)
    optimizer, scheduler = _train_state(model)
    run_dir.mkdir(parents=True)
    config = GRPOConfig()
    config.model.path = str(model_dir)
    save_config(config, run_dir / "config.yaml")
    ckpt = save_checkpoint(run_dir / "checkpoints", step, model, optimizer, scheduler, {"step": step})
    return model, ckpt


def logits(model: torch.nn.Module, processor: Processor, seed: int = 0) -> torch.Tensor:
    """A real multimodal forward: an image, a question, and the model's (t, h, w) rope positions."""
    sample = Sample(prompt="<image> What colour is the shape?", images=[ImageSource(make_test_image(90, 60, seed))],
                    target="red")
    processed = processor(sample, add_target=True)
    input_ids = processed.input_ids[None]
    assert processed.pixel_values is not None and (input_ids == processor.image_token_id).sum() > 0
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                     position_ids=processed.position_ids[:, None], pixel_values=processed.pixel_values,
                     image_grid_thw=processed.image_grid_thw, use_cache=False).logits


def safetensors_contents(folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """{weight name: (file, tensor)} over every *.safetensors in `folder`."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert key not in found, f"{key} written twice"
                found[key] = (file.name, f.get_tensor(key))
    return found


def load_hf(folder: Path, **kwargs) -> torch.nn.Module:
    """Plain transformers, failing on any missing, unexpected or mismatched weight."""
    model, info = AutoModelForImageTextToText.from_pretrained(folder, output_loading_info=True, **kwargs)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def assert_same_weights(converted: torch.nn.Module, live: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
    got, want = converted.state_dict(), live.state_dict()
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        expected = tensor.to(dtype) if dtype is not None else tensor
        assert got[key].dtype == expected.dtype and torch.equal(got[key], expected), key


def save_pretrained_names(model: torch.nn.Module, folder: Path) -> set[str]:
    model.save_pretrained(folder)
    return set(safetensors_contents(folder))


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def tiny_dir(request, tiny_qwen25_dir, tiny_qwen3_dir) -> Path:
    return {"qwen2_5_vl": tiny_qwen25_dir, "qwen3_vl": tiny_qwen3_dir}[request.param]


def test_converted_folder_is_the_trained_model(tiny_dir, tmp_path):
    live, ckpt = make_run(tmp_path / "run", tiny_dir)
    out = convert_checkpoint(ckpt, tmp_path / "hf", max_shard_size_bytes=SHARD, progress=False)  # base: config.yaml
    assert out == tmp_path / "hf"
    assert not list(tmp_path.glob(".tmp_*"))

    # shards + index, named as transformers names them, each file within the size limit
    written = safetensors_contents(out)
    files = sorted({file for file, _ in written.values()})
    assert len(files) > 3 and files == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                                        for i in range(1, len(files) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: file for name, (file, _) in written.items()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for _, t in written.values())
    for file in files:
        tensors = [t for f, t in written.values() if f == file]
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors) <= SHARD

    # the names save_pretrained writes (transformers 5 writes Qwen2.5-VL in its original layout),
    # the tied lm_head left out
    assert set(written) == save_pretrained_names(live, tmp_path / "save_pretrained")
    assert "lm_head.weight" not in written
    if json.loads((tiny_dir / "config.json").read_text())["model_type"] == "qwen2_5_vl":
        assert any(k.startswith("visual.") for k in written) and any(k.startswith("model.layers.") for k in written)

    # plain transformers loads it with nothing missing, and it is the trained model, not the base
    converted = load_hf(out)
    assert_same_weights(converted, live)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    processor = Processor.from_pretrained(out)
    assert torch.equal(logits(converted, processor), logits(live, processor))
    assert not torch.allclose(logits(base, processor), logits(live, processor), atol=1e-3)

    # config, generation settings, tokenizer and processor files from the base folder
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert (out / "generation_config.json").read_bytes() == (tiny_dir / "generation_config.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\nFind x.<|im_end|>"
    assert tokenizer(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_dir)(text)["input_ids"]
    sample = Sample(prompt="<image> Find x.", images=[ImageSource(make_test_image(70, 100))])
    ours, theirs = processor(sample), Processor.from_pretrained(tiny_dir)(sample)
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.pixel_values, theirs.pixel_values)


def test_cli_converts_a_run_checkpoint_to_bfloat16(tiny_qwen25_dir, tmp_path):
    live, ckpt = make_run(tmp_path / "run", tiny_qwen25_dir)
    out = tmp_path / "models" / "step_2_bf16"
    result = subprocess.run(
        [sys.executable, "-m", "lensrl", "convert", "--ckpt", str(ckpt), "--out", str(out),
         "--dtype", "bfloat16", "--max-shard-size", "300KB"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    assert not list(out.parent.glob(".tmp_*"))
    written = safetensors_contents(out)
    assert {t.dtype for _, t in written.values()} == {torch.bfloat16}
    assert len({file for file, _ in written.values()}) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    converted = load_hf(out, dtype="auto")
    assert converted.dtype == torch.bfloat16
    assert_same_weights(converted, live, torch.bfloat16)


def test_untied_lm_head_is_written(tiny_qwen25_dir, tmp_path):
    base = tmp_path / "untied"
    shutil.copytree(tiny_qwen25_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (base / "config.json").write_text(json.dumps(config))
    live, ckpt = make_run(tmp_path / "run", base)
    out = convert_checkpoint(ckpt, tmp_path / "hf", base=str(base), progress=False)
    written = safetensors_contents(out)
    assert list(out.glob("*.safetensors")) == [out / "model.safetensors"]  # one shard: no index
    assert not (out / "model.safetensors.index.json").exists()
    assert "lm_head.weight" in written and set(written) == save_pretrained_names(live, tmp_path / "sp")
    converted = load_hf(out)
    assert_same_weights(converted, live)
    processor = Processor.from_pretrained(out)
    assert torch.equal(logits(converted, processor), logits(live, processor))


_FSDP_WORKER = """
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForImageTextToText
from tests.train.test_convert import _perturb
from lensrl.train.checkpoint import save_checkpoint

dist.init_process_group("gloo")
model_dir, root = sys.argv[1], sys.argv[2]
model = AutoModelForImageTextToText.from_pretrained(model_dir)
_perturb(model, seed=3)
if dist.get_rank() == 0:
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, f"{root}/expected.pt")
for layer in model.model.language_model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters())
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
save_checkpoint(f"{root}/checkpoints", 5, model, optimizer, scheduler, {"step": 5})
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_checkpoint_written_by_two_fsdp2_ranks(tiny_qwen3_dir, tmp_path):
    """Each rank holds half of every weight (FSDP2 DTensor shards); one CPU process converts them."""
    worker = tmp_path / "worker.py"
    worker.write_text(_FSDP_WORKER)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
         str(tiny_qwen3_dir), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**_env(), "OMP_NUM_THREADS": "1"}, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "step_5"
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    out = convert_checkpoint(ckpt, tmp_path / "hf", base=str(tiny_qwen3_dir), max_shard_size_bytes=SHARD,
                             progress=False)
    expected = torch.load(tmp_path / "expected.pt")
    got = load_hf(out).state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen25_ckpt(tiny_qwen25_dir, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("errors") / "run", tiny_qwen25_dir)[1]


def test_folder_without_meta_json_is_named(tmp_path, qwen25_ckpt, capsys):
    partial = tmp_path / "checkpoints" / ".tmp_step_7"
    shutil.copytree(qwen25_ckpt, partial)
    (partial / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"\.tmp_step_7 is not a complete lensrl checkpoint: no meta\.json"):
        convert_checkpoint(partial, tmp_path / "out", progress=False)
    with pytest.raises(SystemExit) as exit_info:  # the CLI prints the same message, no traceback
        cli_main(["convert", "--ckpt", str(partial), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err
    # the run folder instead of a checkpoint: the message lists the complete ones
    with pytest.raises(FileNotFoundError, match=r"step_2"):
        convert_checkpoint(qwen25_ckpt.parent.parent, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp_out").exists()


def test_no_base_says_to_pass_base(tmp_path, qwen25_ckpt, tiny_qwen25_dir):
    lone = tmp_path / "copied" / "step_2"  # no ../../config.yaml
    shutil.copytree(qwen25_ckpt, lone)
    with pytest.raises(FileNotFoundError, match="pass --base"):
        convert_checkpoint(lone, tmp_path / "out", progress=False)
    run = tmp_path / "run"
    shutil.copytree(qwen25_ckpt.parent.parent, run)
    config = GRPOConfig()
    config.model.path = str(tmp_path / "moved_away")
    save_config(config, run / "config.yaml")
    with pytest.raises(FileNotFoundError, match="pass --base"):
        convert_checkpoint(run / "checkpoints" / "step_2", tmp_path / "out", progress=False)
    assert convert_checkpoint(lone, tmp_path / "out", base=str(tiny_qwen25_dir), progress=False).is_dir()


def test_wrong_base_and_bad_arguments(tmp_path, qwen25_ckpt, tiny_qwen3_dir, tiny_qwen25_dir):
    with pytest.raises(ConvertError, match="does not match base model|does not.*--base"):
        convert_checkpoint(qwen25_ckpt, tmp_path / "out", base=str(tiny_qwen3_dir), progress=False)
    with pytest.raises(ConvertError, match="unknown dtype"):
        convert_checkpoint(qwen25_ckpt, tmp_path / "out", dtype="int8", progress=False)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        convert_checkpoint(qwen25_ckpt, taken, progress=False)
    assert (taken / "keep.txt").read_text() == "mine"
    assert parse_size("5GB") == 5 * 10**9 and parse_size("4GiB") == 4 * 2**30 and parse_size("300KB") == 300_000
    assert parse_size("1024") == 1024
    with pytest.raises(ConvertError, match="cannot read size"):
        parse_size("lots")


def test_shape_name_base_is_its_weightless_folder(tmp_path, qwen25_ckpt, monkeypatch):
    """A shape name resolves to shape_dir(name); a tiny checkpoint does not fit a 3B shape."""
    monkeypatch.setenv("LENSRL_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ConvertError, match=r"shapes/qwen2_5_vl_3b: .*embed_tokens.weight has shape .*base model \(151936, 2048\)"):
        convert_checkpoint(qwen25_ckpt, tmp_path / "out", base="qwen2_5_vl_3b", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_crash_leaves_no_output(tmp_path, qwen25_ckpt, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_module, "_write_model_files", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(qwen25_ckpt, tmp_path / "out", max_shard_size_bytes=SHARD, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

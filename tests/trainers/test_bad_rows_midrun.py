"""Bad data found mid-run: a PNG whose header is fine and whose pixels are cut short passes loading
and fails at the step that decodes it. The run stops naming it; with data.skip_bad_rows the run
resumes past it (the sampler's position is kept by row id), and a row that fails inside a step is
skipped, counted in data/skipped_rows and replaced, so the batch stays full."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from test_sft import sft_overrides
from trainer_helpers import grpo_overrides, run_cli

from lensrl.config import GRPOConfig, SFTConfig, load_config
from lensrl.data.datasets import BatchSampler
from lensrl.logging import read_metrics
from lensrl.trainers.grpo import GRPOTrainer
from lensrl.trainers.sft import SFTTrainer


def truncate(png: bytes) -> bytes:
    """`png` cut a third of the way into its pixel data: the header (size) still reads."""
    start = png.index(b"IDAT")
    return png[: start + (len(png) - start) // 3]


def noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_truncated_png_stops_the_run_by_name_and_skip_bad_rows_resumes_past_it(tiny_qwen25_dir, color_data,
                                                                                  tmp_path):
    """SFT, batches of 8 over the 64 colour rows, one of step 2's images truncated: `lensrl sft`
    trains step 1, checkpoints it and stops at step 2 naming the file, row and fault. Resumed with
    data.skip_bad_rows=true (63 rows now), it continues at the saved place without that row and
    logs data/skipped_rows."""
    reference = BatchSampler(64, 8, seed=1)  # the run's order: 64 rows, batches of 8, data.seed=1
    batches = [reference.next_batch() for _ in range(3)]
    bad_row = batches[1][3]  # one of step 2's rows
    table = pq.read_table(color_data / "train.parquet")
    images = table.column("images").to_pylist()
    images[bad_row][0]["bytes"] = truncate(noise_png(0))
    table = table.set_column(table.schema.get_field_index("images"), "images",
                             pa.array(images, table.schema.field("images").type))
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(table, data / "train.parquet")
    overrides = sft_overrides(tiny_qwen25_dir, data, tmp_path, "bad", "data.val_files=null", "trainer.total_steps=2",
                              "trainer.save_freq=1", "trainer.save_hf=false")

    stopped = run_cli("sft", *overrides)
    assert stopped.returncode == 2
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data / 'train.parquet'} row {bad_row} column 'images'[0]: cannot decode image")
    assert "truncated" in last and "data.skip_bad_rows=true" in last
    run = tmp_path / "bad"
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]

    trainer = SFTTrainer(load_config(SFTConfig, None, [*overrides, "data.skip_bad_rows=true"]))
    assert len(trainer.train_data) == 63 and trainer.step == 1  # resumed, the bad row dropped at load
    assert "1 of the 56 rows left in epoch 0" in trainer.sampler.resume_note
    step_2 = [trainer.train_data.row_id(i) for i in copy.deepcopy(trainer.sampler).next_batch()]
    assert step_2 == [row for row in batches[1] + batches[2] if row != bad_row][:8]  # the saved order, less it
    trainer.fit()
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["data/skipped_rows"] == 1.0 and np.isfinite(records[-1]["train/loss"])


def test_a_row_that_breaks_during_a_grpo_step_is_skipped_counted_and_replaced(tiny_qwen25_dir, color_data, tmp_path):
    """Images read from files: one of step 1's files is truncated after loading (as a file changed
    on a shared disk would be). With data.skip_bad_rows the step warns, trains on a full batch of 4
    prompts, logs data/skipped_rows=1; a resumed run keeps that row out and counts it once."""
    table = pq.read_table(color_data / "train.parquet").slice(0, 16).to_pylist()
    (tmp_path / "img").mkdir()
    lines = []
    for i, row in enumerate(table):
        (tmp_path / "img" / f"{i}.png").write_bytes(row["images"][0]["bytes"])
        lines.append(json.dumps({"problem": row["problem"], "answer": row["answer"], "images": [f"img/{i}.png"]}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    overrides = grpo_overrides(tiny_qwen25_dir, color_data, tmp_path, "g", "data.val_files=null",
                               f"data.train_files=[{tmp_path / 'train.jsonl'}]", "data.skip_bad_rows=true",
                               "trainer.total_steps=1", "trainer.save_freq=1", "trainer.save_hf=false")
    trainer = GRPOTrainer(load_config(GRPOConfig, None, overrides))
    victim = copy.deepcopy(trainer.sampler).next_batch()[2]  # all 16 rows loaded: index = row id
    victim_file = tmp_path / "img" / f"{victim}.png"
    victim_file.write_bytes(truncate(victim_file.read_bytes()))

    collected = []  # what each step's rollout trained on
    collect = trainer.collect
    trainer.collect = lambda step, timing: collected.append(collect(step, timing)) or collected[-1]
    trainer.fit()
    assert len({row["gid"] // 4 for row in collected[0].everyone}) == 4  # 4 prompts, a full batch
    assert trainer.sampler.skipped == [victim]
    [record] = read_metrics(tmp_path / "g")
    assert record["data/skipped_rows"] == 1.0 and np.isfinite(record["actor/pg_loss"])

    resumed = GRPOTrainer(load_config(GRPOConfig, None, [*overrides, "trainer.total_steps=2"]))
    assert resumed.step == 1 and len(resumed.train_data) == 15  # now caught at load, and still out
    assert resumed.sampler.num_skipped == 1 and resumed.sampler.skipped == [victim]

"""geometry3k and Robo2VLM-1 folders, as downloaded, -> lensrl's parquet layout."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lensrl.config import DataConfig
from lensrl.data.datasets import load_dataset
from lensrl.data.geo3k import R1_INSTRUCTION, convert_geo3k
from lensrl.data.robo2vlm import convert_robo2vlm
from lensrl.data.sample import DataError

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
ROBO_CFG = DataConfig(
    prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"]
)


def png(shade: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (shade, 100, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Robo2VLM-1
# ----------------------------------------------------------------------------------------------


def robo_shard(path, split: str, start: int, count: int, choices=None, answers=None):
    ids = [f"{split}_{i}" for i in range(start, start + count)]
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "question": [f"Is the gripper open? ({i})" for i in ids],
                "choices": choices or ["['yes', 'no', 'unclear']"] * count,
                "correct_answer": answers or [i % 3 for i in range(count)],
                "image": pa.array(
                    [{"bytes": png(i % 250), "path": f"{i}.jpg"} for i in range(count)], IMAGE_STRUCT
                ),
                "tag": ["gripper"] * count,
            }
        ),
        path,
        row_group_size=3,
    )


def robo_folder(tmp_path):
    src = tmp_path / "Robo2VLM-1" / "data"
    src.mkdir(parents=True)
    robo_shard(src / "train-00000-of-00002.parquet", "train", 0, 7)
    robo_shard(src / "test-00000-of-00002.parquet", "test", 0, 4)
    robo_shard(src / "train-00001-of-00002.parquet", "train", 7, 5)
    robo_shard(src / "test-00001-of-00002.parquet", "test", 4, 2)
    return src.parent


def test_robo2vlm_splits_mixed_shards_apart(tmp_path):
    out = tmp_path / "out"
    counts = convert_robo2vlm(robo_folder(tmp_path), out)
    assert counts == {"train": 12, "test": 6}

    train = pq.read_table(out / "train.parquet")
    test = pq.read_table(out / "test.parquet")
    assert train.num_rows == 12 and test.num_rows == 6
    assert not set(train.column("id").to_pylist()) & set(test.column("id").to_pylist())
    assert all(i.startswith("train_") for i in train.column("id").to_pylist())
    assert train.schema.field("choices").type == pa.list_(pa.string())
    assert train.column("choices")[0].as_py() == ["yes", "no", "unclear"]

    dataset = load_dataset([str(out / "test.parquet")], ROBO_CFG, "test")
    sample = dataset[1]
    assert (sample.answer, sample.target) == ("B", "B. no")
    assert sample.prompt.endswith("Choices:\nA. yes\nB. no\nC. unclear")
    assert sample.load_images()[0].size == (6, 6)


def test_robo2vlm_rejects_a_shard_that_is_neither_train_nor_test(tmp_path):
    src = robo_folder(tmp_path)
    robo_shard(src / "data" / "validation-00000-of-00001.parquet", "val", 0, 2)
    with pytest.raises(DataError, match="validation-00000-of-00001.parquet: neither a train nor a test"):
        convert_robo2vlm(src, tmp_path / "out")
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_robo2vlm_malicious_choices_name_file_and_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    robo_shard(
        src / "train-00000-of-00001.parquet",
        "train",
        0,
        3,
        choices=["['a', 'b']", "['a', 'b']", "__import__('os').system('echo hi')"],
    )
    with pytest.raises(DataError, match=r"train-00000-of-00001\.parquet row 2 \(id train_2\): choices"):
        convert_robo2vlm(src, tmp_path / "out")
    assert list((tmp_path / "out").glob("*")) == []  # nothing half-written


def test_robo2vlm_answer_out_of_range_names_the_row(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    robo_shard(src / "test-00000-of-00001.parquet", "test", 0, 4, answers=[0, 1, 2, 3])
    with pytest.raises(DataError, match=r"row 3 \(id test_3\): answer index 3 is out of range"):
        convert_robo2vlm(src, tmp_path / "out")


def test_robo2vlm_missing_column(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"id": ["a"], "question": ["q"]}), src / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match="missing column.*choices.*columns present: id, question"):
        convert_robo2vlm(src, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# geometry3k
# ----------------------------------------------------------------------------------------------


def hub_shard(path, count: int, start: int = 0):
    pq.write_table(
        pa.table(
            {
                "images": pa.array(
                    [[{"bytes": png(i), "path": None}] for i in range(start, start + count)],
                    pa.list_(IMAGE_STRUCT),
                ),
                "problem": [f"<image>Find x. ({i})" for i in range(start, start + count)],
                "answer": [f"\\frac{{{i}}}{{2}}" for i in range(start, start + count)],
                "id": [str(i) for i in range(start, start + count)],
                "choices": [["1", "2", "3", "4"]] * count,
                "ground_truth": ["A"] * count,
            }
        ),
        path,
    )


def test_geo3k_hub_layout(tmp_path):
    src = tmp_path / "geometry3k" / "data"
    src.mkdir(parents=True)
    hub_shard(src / "train-00000-of-00001.parquet", 5)
    hub_shard(src / "validation-00000-of-00001.parquet", 2, start=100)
    hub_shard(src / "test-00000-of-00001.parquet", 3, start=200)
    out = tmp_path / "out"

    assert convert_geo3k(src.parent, out) == {"train": 5, "val": 2, "test": 3}
    train = pq.read_table(out / "train.parquet")
    assert train.column_names == ["images", "problem", "answer"]
    assert train.column("problem")[0].as_py() == "<image>Find x. (0)"  # no instruction by default
    assert pq.read_table(out / "val.parquet").column("problem")[0].as_py() == "<image>Find x. (100)"

    dataset = load_dataset([str(out / "test.parquet")], DataConfig(), "test")
    assert [s.answer for s in dataset] == ["\\frac{200}{2}", "\\frac{201}{2}", "\\frac{202}{2}"]
    assert dataset[0].load_images()[0].getpixel((0, 0)) == (200, 100, 200)


def test_geo3k_instruction_appended(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    hub_shard(src / "train-00000-of-00001.parquet", 1)
    convert_geo3k(src, tmp_path / "out", instruction=R1_INSTRUCTION)
    problem = pq.read_table(tmp_path / "out" / "train.parquet").column("problem")[0].as_py()
    assert problem == "<image>Find x. (0) " + R1_INSTRUCTION
    assert "<think> </think>" in R1_INSTRUCTION and "\\boxed{}" in R1_INSTRUCTION


def rlinf_shard(path, answers):
    pq.write_table(
        pa.table(
            {
                "problem": ["<image>\nFind x."] * len(answers),
                "images": pa.array([[png(i)] for i in range(len(answers))], pa.list_(pa.binary())),
                "answer": answers,
            }
        ),
        path,
    )


def test_geo3k_rlinf_layout_unwraps_boxed_answers(tmp_path):
    src = tmp_path / "geo3k"
    src.mkdir()
    rlinf_shard(src / "train.parquet", ["\\boxed{3}", "\\boxed{2\\sqrt{3}}"])
    rlinf_shard(src / "test.parquet", ["\\boxed{\\frac{15}{2}}"])
    out = tmp_path / "out"

    assert convert_geo3k(src, out, layout="rlinf") == {"train": 2, "test": 1}
    table = pq.read_table(out / "train.parquet")
    assert table.schema.field("images").type == pa.list_(IMAGE_STRUCT)
    assert table.column("answer").to_pylist() == ["3", "2\\sqrt{3}"]
    dataset = load_dataset([str(out / "train.parquet")], DataConfig(), "train")
    assert dataset[1].prompt == "<image>\nFind x." and dataset[1].target == "\\boxed{2\\sqrt{3}}"
    assert dataset[1].load_images()[0].size == (6, 6)
    # "auto" recognises the boxed answers too.
    convert_geo3k(src, tmp_path / "auto")
    assert pq.read_table(tmp_path / "auto" / "test.parquet").column("answer").to_pylist() == ["\\frac{15}{2}"]


def test_geo3k_rlinf_layout_requires_boxed_answers(tmp_path):
    src = tmp_path / "geo3k"
    src.mkdir()
    rlinf_shard(src / "train.parquet", ["\\boxed{3}", "4"])
    with pytest.raises(DataError, match=r"train\.parquet row 1: layout 'rlinf' expects"):
        convert_geo3k(src, tmp_path / "out", layout="rlinf")


def test_geo3k_missing_column_and_unknown_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), src / "train-00000-of-00001.parquet")
    with pytest.raises(DataError, match="missing column.*images, problem.*columns present: question, answer"):
        convert_geo3k(src, tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    hub_shard(other / "extra.parquet", 1)
    with pytest.raises(DataError, match="extra.parquet: cannot tell the split"):
        convert_geo3k(other, tmp_path / "out")

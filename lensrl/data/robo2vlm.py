"""Robo2VLM-1 as users download it -> separate train and test parquet files.

The hub copy (`keplerccc/Robo2VLM-1`) ships train and test shards mixed in one folder
(`train-00000-of-00262.parquet` ... `test-00002-of-00003.parquet`), so a loader pointed at the
folder would train on the test set. This splits them by file name, shard by shard (the real
dataset is large: one shard is in memory at a time), and parses `choices` (a string holding a
Python-style list) into a real list column once, safely.

Output columns: `id`, `question`, `choices` (list of strings), `correct_answer` (int index),
`image` (`{bytes, path}`), `tag`. Train with `prompt_key: question`, `choice_key: choices`,
`answer_key: correct_answer`, `image_keys: [image]`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lensrl.data.datasets import IMAGE_TYPE, SplitWriter, image_struct
from lensrl.data.prompts import answer_index, parse_choices
from lensrl.data.sample import DataError

ROBO2VLM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("correct_answer", pa.int64()),
        ("image", IMAGE_TYPE),
        ("tag", pa.string()),
    ]
)
_REQUIRED = ("id", "question", "choices", "correct_answer", "image")
_SHARD_PATTERN = re.compile(r"^(train|test)(?:[-_.].*)?\.parquet$")


def convert_robo2vlm(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, int]:
    """Write `out_dir/train.parquet` and `out_dir/test.parquet`; returns rows written per split."""
    shards = _find_shards(Path(src_dir))
    with SplitWriter(out_dir, ROBO2VLM_SCHEMA) as writer:
        for split, shard in shards:
            for table in _convert_shard(shard):
                writer.write(split, table)
    return writer.counts


def _find_shards(src: Path) -> list[tuple[str, Path]]:
    if not src.is_dir():
        raise DataError(f"Robo2VLM source folder not found: {src}")
    files = sorted(src.glob("*.parquet")) + sorted((src / "data").glob("*.parquet"))
    if not files:
        raise DataError(f"{src} holds no parquet files (looked in {src} and {src / 'data'})")
    shards = []
    for file in files:
        match = _SHARD_PATTERN.match(file.name)
        if match is None:
            raise DataError(
                f"{file}: neither a train nor a test shard; expected names like "
                "train-00000-of-00262.parquet or test-00000-of-00003.parquet. Move it out of the folder."
            )
        shards.append((match.group(1), file))
    return shards


def _convert_shard(path: Path):
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    missing = [key for key in _REQUIRED if key not in names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; columns present: {', '.join(names)} "
            f"(Robo2VLM needs {', '.join(_REQUIRED)}, and optionally tag)"
        )
    columns = [*_REQUIRED, *(["tag"] if "tag" in names else [])]
    row = 0
    for batch in parquet.iter_batches(batch_size=512, columns=columns):
        ids = batch.column("id").to_pylist()
        questions = batch.column("question").to_pylist()
        raw_choices = batch.column("choices").to_pylist()
        raw_answers = batch.column("correct_answer").to_pylist()
        choices, answers = [], []
        for i in range(batch.num_rows):
            where = f"{path} row {row + i} (id {ids[i]})"
            if not isinstance(questions[i], str):
                raise DataError(f"{where}: question must be a string, got {questions[i]!r}")
            parsed = parse_choices(raw_choices[i], where)
            choices.append(parsed)
            answers.append(answer_index(raw_answers[i], parsed, where))
        tags = batch.column("tag") if "tag" in names else pa.nulls(batch.num_rows, pa.string())
        yield pa.table(
            {
                "id": pc.cast(batch.column("id"), pa.string()),
                "question": batch.column("question"),
                "choices": pa.array(choices, pa.list_(pa.string())),
                "correct_answer": pa.array(answers, pa.int64()),
                "image": _images(batch.column("image"), path, row),
                "tag": pc.cast(tags, pa.string()),
            },
            schema=ROBO2VLM_SCHEMA,
        )
        row += batch.num_rows


def _images(column: pa.Array, path: Path, first_row: int) -> pa.Array:
    """The image column as `{bytes, path}` structs, kept in Arrow when it already is one."""
    if (
        pa.types.is_struct(column.type)
        and column.type.get_field_index("bytes") >= 0
        and column.null_count == 0
    ):
        data = pc.struct_field(column, "bytes")
        if data.null_count == 0:  # every image embedded: no per-row Python work
            has_path = column.type.get_field_index("path") >= 0
            paths = pc.struct_field(column, "path") if has_path else pa.nulls(len(column), pa.string())
            return pa.StructArray.from_arrays(
                [pc.cast(data, pa.binary()), pc.cast(paths, pa.string())], fields=list(IMAGE_TYPE)
            )
    values = column.to_pylist()
    structs = []
    for i, value in enumerate(values):
        where = f"{path} row {first_row + i} column 'image'"
        if value is None:
            raise DataError(f"{where}: the image is missing")
        structs.append(image_struct(value, str(path.parent), where))
    return pa.array(structs, IMAGE_TYPE)

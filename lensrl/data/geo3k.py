"""geometry3k as users download it -> lensrl's parquet layout.

Reads either layout found in the wild:
- the Hugging Face hub copy (`hiyouga/geometry3k`): shards `train-*.parquet`, `validation-*.parquet`,
  `test-*.parquet` (in the folder or its `data/` subfolder); `images` a list of `{bytes, path}`
  structs, `problem` like `"<image>Find x."`, `answer` a bare string such as `"2\\sqrt{3}"`;
- RLinf's copy (`CAIR-HKISI/geo3k`): `images` a list of raw bytes (or base64 strings / file
  paths), `problem` like `"<image>\\n..."`, `answer` wrapped as `"\\boxed{x}"` (unwrapped here).

and writes `train.parquet`, `val.parquet` (validation, never mixed into train) and `test.parquet`
with columns `images` (list of `{bytes, path}`), `problem`, `answer` (bare string). Other columns
(`id`, `choices`, `ground_truth`, ...) are dropped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from lensrl.data.datasets import IMAGE_LIST_TYPE, SplitWriter, image_struct
from lensrl.data.prompts import R1_INSTRUCTION, append_instruction, unwrap_boxed
from lensrl.data.sample import DataError

__all__ = ["R1_INSTRUCTION", "GEO3K_SCHEMA", "convert_geo3k"]

GEO3K_SCHEMA = pa.schema([("images", IMAGE_LIST_TYPE), ("problem", pa.string()), ("answer", pa.string())])

_SPLIT_NAMES = {
    "train": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}
_SPLIT_PATTERN = re.compile(r"(?:^|[-_.])(train|validation|valid|val|dev|test)(?=[-_.]|$)")


def convert_geo3k(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    instruction: str | None = None,
    layout: Literal["auto", "hub", "rlinf"] = "auto",
) -> dict[str, int]:
    """Convert a downloaded geometry3k folder; returns the number of rows written per split.

    `instruction` is appended to each problem ("{problem} {instruction}"); pass
    `R1_INSTRUCTION` for the verl/EasyR1 prompt. The default keeps problems as published, so
    the instruction can be set at training time (`data.instruction`) instead.
    `layout`: "hub" keeps answers verbatim, "rlinf" requires `\\boxed{...}` answers and unwraps
    them, "auto" unwraps answers that are wholly boxed.
    """
    if layout not in ("auto", "hub", "rlinf"):
        raise ValueError(f"layout must be 'auto', 'hub' or 'rlinf', got {layout!r}")
    shards = _find_shards(Path(src))
    with SplitWriter(out_dir, GEO3K_SCHEMA) as writer:
        for split, shard in shards:
            for table in _convert_shard(shard, instruction, layout):
                writer.write(split, table)
    return writer.counts


def _find_shards(src: Path) -> list[tuple[str, Path]]:
    if not src.is_dir():
        raise DataError(f"geometry3k source folder not found: {src}")
    files = sorted(src.glob("*.parquet")) + sorted((src / "data").glob("*.parquet"))
    if not files:
        raise DataError(f"{src} holds no parquet files (looked in {src} and {src / 'data'})")
    shards = []
    for file in files:
        match = _SPLIT_PATTERN.search(file.stem)
        if match is None:
            raise DataError(
                f"{file}: cannot tell the split from the file name; expected train-*, validation-* or "
                "test-* (e.g. train-00000-of-00001.parquet)"
            )
        shards.append((_SPLIT_NAMES[match.group(1)], file))
    return shards


def _convert_shard(path: Path, instruction: str | None, layout: str):
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    missing = [key for key in ("images", "problem", "answer") if key not in names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; columns present: {', '.join(names)} "
            "(geometry3k needs images, problem and answer)"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=256, columns=["images", "problem", "answer"]):
        images, problems, answers = [], [], []
        for value, problem, answer in zip(*(batch.column(k).to_pylist() for k in batch.schema.names)):
            where = f"{path} row {row}"
            if not isinstance(problem, str) or answer is None:
                raise DataError(f"{where}: problem must be a string and answer non-empty")
            values = value if isinstance(value, list) else ([] if value is None else [value])
            images.append(
                [image_struct(v, str(path.parent), f"{where} image {i}") for i, v in enumerate(values)]
            )
            problems.append(append_instruction(problem, instruction))
            answers.append(_answer(str(answer), layout, where))
            row += 1
        yield pa.table({"images": images, "problem": problems, "answer": answers}, schema=GEO3K_SCHEMA)


def _answer(answer: str, layout: str, where: str) -> str:
    if layout == "hub":
        return answer.strip()
    bare = unwrap_boxed(answer)
    if layout == "rlinf" and bare == answer:
        raise DataError(f"{where}: layout 'rlinf' expects answers like \\boxed{{x}}, got {answer!r}")
    return bare.strip()

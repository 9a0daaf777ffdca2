"""load_dataset on parquet files in the layouts users bring, its checks, and BatchSampler."""

from __future__ import annotations

import base64
import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lensrl.config import DataConfig
from lensrl.data import prompts
from lensrl.data.datasets import BatchSampler, load_dataset, process_rows
from lensrl.data.sample import DataError, ImageSource

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path, columns: dict, schema: pa.Schema | None = None):
    pq.write_table(pa.table(columns, schema=schema), path)
    return str(path)


def length_fn(sample) -> int:  # stands in for the processor: characters + 4 tokens per image
    return len(sample.prompt) + 4 * len(sample.images)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------


def test_geo3k_hub_layout(tmp_path):
    path = write(
        tmp_path / "train-00000-of-00001.parquet",
        {
            "images": pa.array(
                [[{"bytes": png(), "path": "a.png"}], [{"bytes": png((0, 0, 255), (5, 7)), "path": None}]],
                pa.list_(IMAGE_STRUCT),
            ),
            "problem": ["<image>Find x.", "<image>Find y."],
            "answer": ["3", "2\\sqrt{3}"],
            "id": ["q1", "q2"],
            "choices": [["1", "2"], ["3", "4"]],  # other columns travel with the row (reward functions)
            "ground_truth": ["3", "2\\sqrt{3}"],
            "thumbnail": pa.array([png(), png()], pa.binary()),  # bytes do not
        },
    )
    cfg = DataConfig(instruction="Think first.", system_prompt="You are a geometer.")
    dataset = load_dataset([path], cfg, "train")

    assert len(dataset) == 2
    sample = dataset[1]
    assert sample.prompt == "<image>Find y. Think first."
    assert sample.answer == "2\\sqrt{3}"
    assert sample.target == "\\boxed{2\\sqrt{3}}"
    assert sample.choices is None
    assert sample.system_prompt == "You are a geometer."
    assert sample.meta == {"source": path, "row": 1, "split": "train", "id": "q2",
                           "columns": {"choices": ["3", "4"], "ground_truth": "2\\sqrt{3}"}}
    from lensrl.rewards.function import reward_sample

    assert reward_sample(sample) == {"choices": None, "ground_truth": "2\\sqrt{3}", "answer": "2\\sqrt{3}",
                                     "prompt": "<image>Find y. Think first.", "data_source": path, "row": 1,
                                     "id": "q2", "assistant_prefix": ""}
    assert isinstance(sample.images[0], ImageSource) and isinstance(sample.images[0].data, dict)
    assert sample.images[0].origin == f"{path} row 1 column 'images'[0]"
    assert sample.load_images()[0].size == (5, 7)
    assert [s.answer for s in dataset] == ["3", "2\\sqrt{3}"]
    assert dataset.stats == {"rows_read": 2, "skipped_bad": 0, "filtered_overlong": 0, "skipped_rows": []}
    assert "2 rows" in dataset.summary()


def test_rlinf_layout_raw_bytes_and_boxed_answers(tmp_path):
    path = write(
        tmp_path / "train.parquet",
        {
            "problem": ["<image>\nFind x.", "<image>\nFind the area."],
            "images": pa.array([[png()], [png((0, 255, 0))]], pa.list_(pa.binary())),
            "answer": ["\\boxed{2\\sqrt{3}}", "\\boxed{\\frac{15}{2}}"],
        },
    )
    dataset = load_dataset(path, DataConfig(), "train")
    assert [s.answer for s in dataset] == ["2\\sqrt{3}", "\\frac{15}{2}"]
    assert dataset[1].target == "\\boxed{\\frac{15}{2}}"
    assert dataset[1].load_images()[0].getpixel((0, 0)) == (0, 255, 0)


def test_base64_strings_and_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "b.png").write_bytes(png((0, 0, 255)))
    write(
        tmp_path / "data.parquet",
        {
            "problem": ["<image>What colour?", "<image>What colour?"],
            "image": [base64.b64encode(png((255, 0, 0))).decode(), "imgs/b.png"],
            "answer": ["red", "blue"],
        },
    )
    dataset = load_dataset([str(tmp_path)], DataConfig(image_keys=["image"]), "test")  # a folder
    assert [s.load_images()[0].getpixel((1, 1)) for s in dataset] == [(255, 0, 0), (0, 0, 255)]
    assert dataset[1].images[0].base_dir == str(tmp_path)


def test_several_images_per_row_and_rows_without_placeholders(tmp_path):
    path = write(
        tmp_path / "multi.parquet",
        {
            "problem": ["Compare <image> with <image>.", "Describe the scene.", "No picture here."],
            "images": pa.array([[png(), png((0, 255, 0))], [png(), png()], []], pa.list_(pa.binary())),
            "answer": ["same", "two squares", "nothing"],
        },
    )
    dataset = load_dataset(path, DataConfig(), "train")
    assert [len(s.images) for s in dataset] == [2, 2, 0]
    assert [im.origin.rsplit("[", 1)[1] for im in dataset[0].images] == ["0]", "1]"]
    assert dataset[0].load_images()[1].getpixel((0, 0)) == (0, 255, 0)


def test_images_from_two_columns_in_order(tmp_path):
    path = write(
        tmp_path / "two.parquet",
        {
            "problem": ["<image> then <image>", "only text"],
            "first": pa.array([png((255, 0, 0)), None], pa.binary()),
            "second": pa.array([[png((0, 0, 255))], []], pa.list_(pa.binary())),
            "answer": ["1", "2"],
        },
    )
    dataset = load_dataset(path, DataConfig(image_keys=["first", "second"]), "train")
    assert [im.getpixel((0, 0)) for im in dataset[0].load_images()] == [(255, 0, 0), (0, 0, 255)]
    assert dataset[1].images == []


# ----------------------------------------------------------------------------------------------
# Checks before the first step
# ----------------------------------------------------------------------------------------------


def test_missing_column_names_key_file_and_present_columns(tmp_path):
    path = write(tmp_path / "x.parquet", {"question": ["q"], "images": [[png()]], "answer": ["a"]})
    with pytest.raises(DataError) as error:
        load_dataset(path, DataConfig(), "train")
    message = str(error.value)
    assert "'problem'" in message and "data.prompt_key" in message and path in message
    assert "question, images, answer" in message


def test_placeholder_count_mismatch_names_the_row(tmp_path):
    path = write(
        tmp_path / "x.parquet",
        {
            "problem": ["<image>ok", "<image><image>two placeholders"],
            "images": pa.array([[png()], [png()]], pa.list_(pa.binary())),
            "answer": ["1", "2"],
        },
    )
    with pytest.raises(DataError, match=r"x\.parquet row 1: the prompt has 2 '<image>' placeholder\(s\) but"):
        load_dataset(path, DataConfig(), "train")


def test_placeholder_without_any_image_is_an_error(tmp_path):
    path = write(
        tmp_path / "x.parquet",
        {"problem": ["<image>Find x."], "images": pa.array([[]], pa.list_(pa.binary())), "answer": ["1"]},
    )
    with pytest.raises(DataError, match="row 0"):
        load_dataset(path, DataConfig(), "train")


def bad_image_table(tmp_path):
    return write(
        tmp_path / "bad.parquet",
        {
            "problem": ["<image>a", "<image>b", "<image>c"],
            "images": pa.array([[png()], [b"not an image at all"], [png()]], pa.list_(pa.binary())),
            "answer": ["1", "2", "3"],
        },
    )


def test_undecodable_image_fails_on_load_naming_file_and_row(tmp_path):
    path = bad_image_table(tmp_path)
    dataset = load_dataset(path, DataConfig(), "train")  # not touched before a batch needs it
    assert len(dataset) == 3
    with pytest.raises(DataError, match=rf"{path} row 1 column 'images'\[0\]: cannot decode image"):
        dataset[1].load_images()


def test_skip_bad_rows_drops_and_counts_undecodable_images(tmp_path):
    path = bad_image_table(tmp_path)
    dataset = load_dataset(path, DataConfig(skip_bad_rows=True), "train")
    assert [s.meta["row"] for s in dataset] == [0, 2]
    assert dataset.stats["skipped_bad"] == 1 and dataset.stats["rows_read"] == 3
    assert "1 skipped" in dataset.summary()


def truncated_png() -> bytes:
    """A PNG whose header is intact and whose pixel data stops a third of the way in: the size
    reads from the header, the pixels do not decode."""
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT")
    return data[: start + (len(data) - start) // 3]


def test_rows_keep_stable_ids_whichever_rows_are_skipped(tmp_path):
    """Row ids count every row read, file after file; skipping a row does not shift the others."""
    a = write(tmp_path / "a.parquet", {"problem": ["<image>a", "<image>b", "<image>c"], "answer": ["1", "2", "3"],
                                       "images": pa.array([[png()], [truncated_png()], [png()]],
                                                          pa.list_(pa.binary()))})
    b = write(tmp_path / "b.parquet", {"problem": ["<image>d", "<image>e"], "answer": ["4", "5"],
                                       "images": pa.array([[png()], [png()]], pa.list_(pa.binary()))})
    everything = load_dataset([a, b], DataConfig(), "train")
    assert everything.row_ids.tolist() == [0, 1, 2, 3, 4] and everything.num_ids == 5
    assert everything.bad_row_ids == set()
    skipping = load_dataset([a, b], DataConfig(skip_bad_rows=True), "train")
    assert skipping.row_ids.tolist() == [0, 2, 3, 4] and skipping.num_ids == 5
    assert [skipping.row_id(i) for i in range(4)] == [0, 2, 3, 4]
    assert skipping.bad_row_ids == {1}
    assert BatchSampler.from_dataset(skipping, 2, seed=0).num_skipped == 1


def test_a_row_that_fails_in_a_step_is_skipped_counted_and_replaced(tmp_path):
    """A truncated PNG passes loading (only headers are read) and fails when a step decodes it:
    without skip_bad_rows the error names the file, the row and what is wrong; with it the row is
    left out, counted, and the next row of the order takes its place, so the batch stays full.
    The skipped row stays out after a resume, counted once."""
    rows = 8
    images = [[png((i, 0, 0))] for i in range(rows)]
    images[5] = [truncated_png()]
    path = write(tmp_path / "t.parquet", {"problem": [f"<image>{i}" for i in range(rows)],
                                          "answer": [str(i) for i in range(rows)],
                                          "images": pa.array(images, pa.list_(pa.binary()))})
    dataset = load_dataset(path, DataConfig(), "train", length_fn=length_fn)
    assert len(dataset) == rows  # the header is fine

    def load(sample):
        return [image.size for image in sample.load_images()]

    sampler = BatchSampler(rows, 4, seed=0, shuffle=False)
    with pytest.raises(DataError, match=rf"{path} row 5 column 'images'\[0\]: cannot decode image .*truncated"
                                        r".*data.skip_bad_rows=true"):
        sampler.next_batch()
        process_rows(dataset, sampler, sampler.next_batch(), range(4), load)

    sampler = BatchSampler(rows, 4, seed=0, shuffle=False)
    first = sampler.next_batch()
    assert first == [0, 1, 2, 3]
    batch = sampler.next_batch()
    assert batch == [4, 5, 6, 7]
    samples, sizes = process_rows(dataset, sampler, batch, range(4), load, skip_bad_rows=True)
    assert [s.meta["row"] for s in samples] == [4, 0, 6, 7]  # row 5's place: the next epoch's first row
    assert batch == [4, 0, 6, 7] and sizes == [[(8, 6)]] * 4
    assert sampler.skipped == [5] and sampler.num_skipped == 1
    assert 5 not in [i for _ in range(4) for i in sampler.next_batch()]  # gone from later epochs

    state = sampler.state_dict()
    assert state["skipped"] == [5]
    resumed = BatchSampler(rows, 4, seed=0, shuffle=False, bad_ids={5})  # this run's loader skips it too
    resumed.load_state_dict(state)
    assert resumed.num_skipped == 1 and resumed.num_items == rows - 1
    assert resumed.next_batch() == sampler.next_batch()


def test_overlong_prompts_filtered_and_counted(tmp_path):
    path = write(
        tmp_path / "x.parquet",
        {
            "problem": ["<image>short", "<image>" + "long " * 20, "<image>also short"],
            "images": pa.array([[png()], [png()], [png()]], pa.list_(pa.binary())),
            "answer": ["1", "2", "3"],
        },
    )
    cfg = DataConfig(max_prompt_length=40, filter_overlong_prompts=True)
    dataset = load_dataset(path, cfg, "train", length_fn=length_fn)
    assert [s.meta["row"] for s in dataset] == [0, 2]
    assert dataset.stats["filtered_overlong"] == 1
    assert "longer than 40 tokens" in dataset.summary()

    cfg = DataConfig(max_prompt_length=40, filter_overlong_prompts=False)
    with pytest.raises(DataError, match=r"x\.parquet row 1: prompt is 111 tokens.*max_prompt_length=40"):
        load_dataset(path, cfg, "train", length_fn=length_fn)


def test_no_usable_rows_is_an_error(tmp_path):
    path = write(tmp_path / "x.parquet", {"problem": ["a" * 50], "images": [[png()]], "answer": ["1"]})
    with pytest.raises(DataError, match="no usable rows"):
        load_dataset(path, DataConfig(max_prompt_length=10), "train", length_fn=length_fn)


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset([str(tmp_path / "nope.parquet")], DataConfig())
    with pytest.raises(DataError, match="no \\*.parquet"):
        load_dataset([str(tmp_path)], DataConfig())


# ----------------------------------------------------------------------------------------------
# Multiple choice
# ----------------------------------------------------------------------------------------------

CHOICE_CFG = DataConfig(
    prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"]
)


def robo_rows(choices, answers):
    return {
        "id": [f"r{i}" for i in range(len(answers))],
        "question": ["Which way does the gripper move?"] * len(answers),
        "choices": choices,
        "correct_answer": answers,
        "image": pa.array([{"bytes": png(), "path": None}] * len(answers), IMAGE_STRUCT),
        "tag": ["direction"] * len(answers),
    }


def test_choices_as_python_list_string_with_index_answer(tmp_path):
    path = write(
        tmp_path / "mc.parquet", robo_rows(["['left', 'right', 'up']", '["open", "closed"]'], [2, 0])
    )
    dataset = load_dataset(path, CHOICE_CFG, "test")
    sample = dataset[0]
    assert sample.choices == ["left", "right", "up"]
    assert sample.answer == "C"
    assert sample.target == "C. up"
    assert sample.prompt == "Which way does the gripper move?\nChoices:\nA. left\nB. right\nC. up"
    assert sample.meta["id"] == "r0"
    assert (dataset[1].answer, dataset[1].target) == ("A", "A. open")


def test_choices_as_real_list_with_letter_answer(tmp_path):
    rows = robo_rows([["red", "green"], ["a", "b", "c", "d"]], ["B", "d"])
    path = write(tmp_path / "mc.parquet", rows)
    dataset = load_dataset(path, CHOICE_CFG, "train")
    assert [(s.answer, s.target) for s in dataset] == [("B", "B. green"), ("D", "D. d")]


@pytest.mark.parametrize(
    "choices",
    [
        "__import__('os').system('echo hi')",
        "[__import__('os').system('echo hi')]",
        "['a', 1]",
        "left, right",
        "[]",
    ],
)
def test_bad_or_malicious_choices_are_rejected_naming_the_row(tmp_path, choices, capfd):
    path = write(tmp_path / "mc.parquet", robo_rows(["['a', 'b']", choices], [0, 0]))
    with pytest.raises(DataError, match=r"mc\.parquet row 1: choices"):
        load_dataset(path, CHOICE_CFG, "train")
    assert "hi" not in capfd.readouterr().out


def test_answer_index_out_of_range_names_the_row(tmp_path):
    path = write(tmp_path / "mc.parquet", robo_rows(["['a', 'b']", "['a', 'b']"], [1, 5]))
    with pytest.raises(DataError, match=r"row 1.*out of range"):
        load_dataset(path, CHOICE_CFG, "train")


# ----------------------------------------------------------------------------------------------
# prompts.py
# ----------------------------------------------------------------------------------------------


def test_prompt_helpers():
    assert prompts.format_choices("Q?", ["x", "y"]) == "Q?\nChoices:\nA. x\nB. y"
    assert prompts.index_to_letter(4) == "E" and prompts.letter_to_index("e") == 4
    assert prompts.count_placeholders("<image>a<image>") == 2
    assert prompts.append_instruction("p", None) == "p" and prompts.append_instruction("p", "i") == "p i"
    assert prompts.unwrap_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert prompts.unwrap_boxed(" \\boxed{3} ") == "3"
    assert prompts.unwrap_boxed("\\boxed{1} + \\boxed{2}") == "\\boxed{1} + \\boxed{2}"
    assert prompts.unwrap_boxed("60") == "60"
    assert prompts.answer_index("up", ["left", "up"]) == 1
    with pytest.raises(DataError):
        prompts.answer_index(True, ["a", "b"])


# ----------------------------------------------------------------------------------------------
# BatchSampler
# ----------------------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    a = BatchSampler(10, 3, seed=7)
    b = BatchSampler(10, 3, seed=7)
    batches = [a.next_batch() for _ in range(6)]
    assert batches == [b.next_batch() for _ in range(6)]
    assert all(len(batch) == 3 for batch in batches)
    epoch0, epoch1 = batches[:3], batches[3:]  # 3 full batches per epoch, the last item dropped
    assert len(set(sum(epoch0, []))) == 9 and len(set(sum(epoch1, []))) == 9
    assert epoch0 != epoch1
    assert BatchSampler(10, 3, seed=8).next_batch() != batches[0]


def test_sampler_resume_continues_with_the_same_batches():
    reference = BatchSampler(11, 4, seed=3)
    expected = [reference.next_batch() for _ in range(9)]
    first = BatchSampler(11, 4, seed=3)
    for _ in range(4):  # stop mid-epoch
        first.next_batch()
    state = first.state_dict()
    resumed = BatchSampler(11, 4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(5)] == expected[4:]
    with pytest.raises(ValueError, match="num_ids=11"):  # other data files: 12 rows read, not 11
        BatchSampler(12, 4, seed=3).load_state_dict(state)


def test_sampler_orders_by_row_id_as_earlier_versions_did_when_every_row_is_present():
    """With no row skipped, the batches are those of the positional sampler lensrl had before
    (a permutation of 0 .. n-1 seeded by seed + epoch, full batches only)."""
    import numpy as np

    expected, epoch = [], 0
    while len(expected) < 9:
        order = np.random.default_rng(3 + epoch).permutation(11)
        expected += [order[b * 4 : (b + 1) * 4].tolist() for b in range(2)]
        epoch += 1
    sampler = BatchSampler(11, 4, seed=3)
    assert [sampler.next_batch() for _ in range(9)] == expected[:9]


def test_sampler_resumes_at_the_same_place_when_a_row_is_skipped_now():
    """Saved with 64 rows after one batch; resumed with row 44 skipped (63 rows, ids 0..63 less 44):
    the rest of the epoch is the saved run's remaining row ids without 44, in the same order, and
    one line says so. The state of lensrl before row ids (positions) resumes the same way."""
    saved = BatchSampler(64, 8, seed=1)
    first = saved.next_batch()
    state = saved.state_dict()
    rest = [row for _ in range(7) for row in saved.next_batch()]  # the epoch as the saved run goes on
    assert 44 in rest and 44 not in first
    ids = [i for i in range(64) if i != 44]
    legacy = {key: state[key] for key in ("epoch", "position", "num_items", "batch_size", "seed")}
    for saved_state in (state, legacy):
        resumed = BatchSampler(63, 8, seed=1, row_ids=ids, num_ids=64)
        resumed.load_state_dict(saved_state)
        assert "1 of the 56 rows left in epoch 0" in resumed.resume_note
        continued = [ids[i] for _ in range(6) for i in resumed.next_batch()]  # indices -> row ids
        assert continued == [row for row in rest if row != 44][:48]
        assert resumed.epoch == 0
        resumed.next_batch()  # 7 rows were left: too few for a batch, so a new epoch starts
        assert resumed.epoch == 1 and resumed.position == 1


def test_sampler_state_from_before_row_ids_with_rows_skipped_then_continues_exactly():
    """An older state saved by a run that had rows skipped (its positions are not row ids) resumes
    exactly when this run has the same rows; a new save in that epoch keeps its order."""
    import numpy as np

    ids = [0, 1, 2, 4, 5, 7, 8, 9, 10, 11]  # 12 rows read, 3 and 6 skipped: 10 rows
    order = np.random.default_rng(5).permutation(10)  # what that run drew for epoch 0 (seed 5)
    legacy = {"epoch": 0, "position": 1, "num_items": 10, "batch_size": 3, "seed": 5}
    sampler = BatchSampler(10, 3, seed=5, row_ids=ids, num_ids=12)
    sampler.load_state_dict(legacy)
    assert sampler.resume_note is None
    assert sampler.next_batch() == order[3:6].tolist()
    again = BatchSampler(10, 3, seed=5, row_ids=ids, num_ids=12)
    again.load_state_dict(sampler.state_dict())
    assert again.next_batch() == order[6:9].tolist()
    with pytest.raises(ValueError, match="cannot tell which rows"):  # 11 of 12: which one is gone?
        BatchSampler(9, 3, seed=5, row_ids=ids[:9], num_ids=12).load_state_dict({**legacy, "num_items": 11})


def test_sampler_one_pass_in_order_and_edge_cases():
    sampler = BatchSampler(5, 2, seed=0, shuffle=False, drop_last=False)
    assert list(sampler.iter_once()) == [[0, 1], [2, 3], [4]]
    assert [sampler.next_batch() for _ in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchSampler(3, 4, seed=0)


def test_skip_bad_rows_skips_every_row_lensrl_cannot_process_and_names_it(tmp_path, tiny_qwen25_dir):
    """An undecodable image, a placeholder/image count mismatch and an image of an aspect ratio
    the processor rejects (over 200:1): with data.skip_bad_rows each is dropped and named with its
    reason; without it, the first stops loading with its row named."""
    from lensrl.models.processor import Processor

    processor = Processor.from_pretrained(tiny_qwen25_dir)
    path = write(tmp_path / "mixed.parquet", {
        "problem": ["<image>ok", "<image>broken", "<image><image>two marks", "<image>a thin strip", "<image>fine"],
        "images": pa.array([[png()], [b"not an image"], [png()], [png(size=(660, 3))], [png()]], pa.list_(pa.binary())),
        "answer": ["1", "2", "3", "4", "5"],
    })
    dataset = load_dataset(path, DataConfig(skip_bad_rows=True), "train", length_fn=processor.prompt_length)
    assert [s.meta["row"] for s in dataset] == [0, 4]
    assert dataset.stats["skipped_bad"] == 3 and dataset.stats["filtered_overlong"] == 0
    summary = dataset.summary()
    assert f"{path} rows 2 (2 '<image>' placeholder(s), 1 image(s))" in summary
    assert f"{path} rows 1 (an image does not decode)" in summary
    assert "rows 3 (" in summary and "aspect ratio" in summary
    with pytest.raises(DataError, match=rf"{path} row 2: the prompt has 2 '<image>' placeholder"):
        load_dataset(path, DataConfig(), "train", length_fn=processor.prompt_length)


def test_a_digit_answer_among_numeric_choices_is_read_as_the_choice_text(tmp_path):
    """Choices ['1', '2', '3', '4'] with answer '2' mean the choice '2' (letter B), not index 2; a
    digit that is none of the numeric choices is ambiguous and stops loading with the row named."""
    assert prompts.answer_index("2", ["1", "2", "3", "4"]) == 1
    assert prompts.answer_index("2", ["red", "green", "blue"]) == 2  # not numbers: an index
    assert prompts.answer_index("B", ["1", "2", "3"]) == 1
    path = write(tmp_path / "mc.parquet", robo_rows(["['1', '2', '3', '4']", "['10', '20', '30']"], ["2", "1"]))
    with pytest.raises(DataError, match=r"row 1: answer '1' is ambiguous"):
        load_dataset(path, CHOICE_CFG, "train")
    path = write(tmp_path / "ok.parquet", robo_rows(["['1', '2', '3', '4']"], ["2"]))
    assert load_dataset(path, CHOICE_CFG, "train")[0].answer == "B"


# ----------------------------------------------------------------------------------------------
# Sources: json, jsonl, folders by split, cached hub datasets
# ----------------------------------------------------------------------------------------------


def test_structured_answers_reach_rewards_as_json(tmp_path):
    import json as json_lib

    (tmp_path / "rows.jsonl").write_text(json_lib.dumps({"problem": "Where?", "answer": {"box": [1, 2, 3, 4]},
                                                         "images": []}) + "\n")
    sample = load_dataset(str(tmp_path / "rows.jsonl"), DataConfig(), "train")[0]
    assert json_lib.loads(sample.answer) == {"box": [1, 2, 3, 4]}


def test_jsonl_and_json_files_with_image_paths(tmp_path):
    import json as json_lib

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png((0, 255, 0)))
    rows = [{"problem": "<image>Find x.", "answer": "3", "images": ["img/a.png"], "level": 2},
            {"problem": "Find y.", "answer": "4", "images": [], "level": 5}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json_lib.dumps(r) for r in rows) + "\n")
    (tmp_path / "rows.json").write_text(json_lib.dumps(rows))
    for name in ("rows.jsonl", "rows.json"):
        dataset = load_dataset(str(tmp_path / name), DataConfig(), "train")  # a single string, not a list
        assert [s.answer for s in dataset] == ["3", "4"]
        assert dataset[0].load_images()[0].getpixel((0, 0)) == (0, 255, 0)  # relative to the file
        assert dataset[1].meta["columns"] == {"level": 5}
    (tmp_path / "bad.json").write_text('{"not": "rows"}')
    with pytest.raises(DataError, match=r"bad.json: expected a JSON list of row objects"):
        load_dataset(str(tmp_path / "bad.json"), DataConfig(), "train")


def test_a_folder_named_by_split_gives_each_split_its_own_files(tmp_path):
    from lensrl.data.synth import make_synth

    make_synth("color", 10, 0, tmp_path, n_test=3)  # train.parquet + test.parquet
    assert len(load_dataset(str(tmp_path), DataConfig(), "train")) == 10  # not 13: test rows stay out
    assert len(load_dataset(str(tmp_path), DataConfig(), "test")) == 3


def hub_cache(home, repo_id: str, files: dict[str, pa.Table]) -> None:
    """The layout `hf download --repo-type dataset REPO` leaves in the Hugging Face hub cache."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    for name, table in files.items():
        (repo / "snapshots" / revision / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, repo / "snapshots" / revision / name)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)


def geo3k_table(answers):
    return pa.table({
        "images": pa.array([[{"bytes": png(), "path": None}] for _ in answers], pa.list_(IMAGE_STRUCT)),
        "problem": ["<image>Find x."] * len(answers), "answer": answers})


def test_a_cached_hub_dataset_loads_by_id_and_split_without_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    hub_cache(tmp_path / "hf", "someone/geometry3k", {
        "data/train-00000-of-00001.parquet": geo3k_table(["1", "2", "3"]),
        "data/validation-00000-of-00001.parquet": geo3k_table(["4"]),
        "data/test-00000-of-00001.parquet": geo3k_table(["5", "6"])})
    assert [s.answer for s in load_dataset("someone/geometry3k", DataConfig(), "train")] == ["1", "2", "3"]
    assert [s.answer for s in load_dataset("someone/geometry3k", DataConfig(), "test")] == ["5", "6"]
    dataset = load_dataset("someone/geometry3k@validation", DataConfig(), "test")
    assert [s.answer for s in dataset] == ["4"] and dataset[0].meta["source"].startswith("someone/geometry3k@validation")
    with pytest.raises(DataError, match=r"someone/other: not a local file or folder.*not a dataset id in the local "
                                        r"Hugging Face cache.*hf download --repo-type dataset someone/other"):
        load_dataset("someone/other", DataConfig(), "train")
    hub_cache(tmp_path / "hf", "someone/valonly", {"data/validation-00000-of-00001.parquet": geo3k_table(["7"])})
    assert [s.answer for s in load_dataset("someone/valonly", DataConfig(), "test")] == ["7"]  # test: validation


def test_a_dataset_saved_by_the_datasets_library(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict({
        "train": datasets.Dataset(geo3k_table(["1", "2"])), "validation": datasets.Dataset(geo3k_table(["3"]))})
    splits.save_to_disk(str(tmp_path / "saved"))
    assert [s.answer for s in load_dataset(str(tmp_path / "saved"), DataConfig(), "train")] == ["1", "2"]
    val = load_dataset(str(tmp_path / "saved"), DataConfig(), "test")  # no "test" split: validation
    assert [s.answer for s in val] == ["3"] and val[0].load_images()[0].size == (8, 6)

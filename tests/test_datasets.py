"""Users' evaluation datasets read in place: Hugging Face parquet repos, `save_to_disk`
directories and ImageFolder trees, locally and on an object store; the papers' validation
subset is exactly torch's random_split."""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from dataset_fixtures import (
    encode,
    labelled,
    sample_images,
    write_hf_parquet,
    write_image_folder,
    write_save_to_disk,
)

import pipeline.evaluation.datasets as datasets
from pipeline.errors import InputError
from pipeline.evaluation.datasets import (
    IMAGE_EXTENSIONS,
    open_dataset,
    papers_validation_rows,
    read_examples,
)
from pipeline.io import storage

CLASSES = ["zebra", "apple", "mango"]  # not sorted: ImageFolder's labels follow sorted names


def splits_of(train: int = 23, test: int = 11) -> dict:
    return {"train": labelled(train, 3, seed=1), "test": labelled(test, 3, seed=2)}


def read_all(source) -> list[tuple[bytes, int]]:
    return [(e.image, e.label) for e in read_examples(source, range(source.num_rows))]


def one_line_error(excinfo, start: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(start), message
    return message


# ---- the papers' validation subset ------------------------------------------------------------

def torch_validation(n: int, size: int, seed: int) -> list[int]:
    """The papers' code: the second subset of random_split(train, [n - size, size])."""
    subsets = torch.utils.data.random_split(cast(Any, range(n)), [n - size, size],
                                            generator=torch.Generator().manual_seed(seed))
    return sorted(subsets[1].indices)


@pytest.mark.parametrize("n,cap", [(1, 5000), (10, 5000), (999, 5000), (1000, 5000),
                                   (12345, 5000), (60000, 5000), (60000, None), (999, None)])
def test_validation_rows_are_random_splits_second_subset(n, cap):
    size = min(int(n * 0.1), cap) if cap is not None else int(n * 0.1)
    with pytest.warns(UserWarning) if n == 1 else _nothing():  # [1, 0]: torch warns
        expected = torch_validation(n, size, seed=0)
    rows = papers_validation_rows(n, cap=cap)
    assert rows.dtype == np.int64 and rows.tolist() == expected


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def test_validation_sizes_cap_and_no_cap():
    assert len(papers_validation_rows(60000)) == 5000
    assert len(papers_validation_rows(60000, cap=None)) == 6000
    assert len(papers_validation_rows(999)) == 99 and len(papers_validation_rows(9)) == 0


def test_validation_rows_follow_seed_and_fraction():
    expected = torch_validation(500, 100, seed=7)
    assert papers_validation_rows(500, 0.2, None, seed=7).tolist() == expected
    assert papers_validation_rows(500, 0.2, None, seed=7).tolist() != \
        papers_validation_rows(500, 0.2, None, seed=0).tolist()


# ---- Hugging Face parquet ---------------------------------------------------------------------

def test_parquet_repo_splits_classnames_and_every_row(tmp_path):
    written = write_hf_parquet(tmp_path, splits_of(), CLASSES, shards=2, row_group_size=4)
    info = open_dataset(str(tmp_path))
    assert info.kind == "parquet" and info.classnames == tuple(CLASSES)
    assert sorted(info.splits) == ["test", "train"]
    train = info.splits["train"]
    assert train.num_rows == 23 and train.file_rows == (12, 11)
    assert [os.path.basename(f) for f in train.files] == [
        "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    for split in ("train", "test"):
        assert read_all(info.splits[split]) == written[split]
    assert pickle.loads(pickle.dumps(train)) == train


def test_parquet_reads_only_the_row_groups_holding_the_rows(tmp_path, monkeypatch):
    written = write_hf_parquet(tmp_path, splits_of(), CLASSES, shards=2, row_group_size=4)
    source = open_dataset(str(tmp_path)).splits["train"]
    calls = []
    original = pq.ParquetFile.read_row_group

    def counting(self, i, columns=None, **kwargs):
        calls.append((self.metadata.num_rows, i, tuple(columns or ())))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    rows = [0, 3, 4, 11, 12, 21, 22]  # shard 0 holds rows 0-11, shard 1 rows 12-22
    examples = list(read_examples(source, rows))
    assert [(e.image, e.label) for e in examples] == [written["train"][r] for r in rows]
    assert [e.row for e in examples] == rows
    shard_rows = (12, 11)
    expected = sorted({(shard_rows[r >= 12], (r - 12 * (r >= 12)) // 4, ("image", "label"))
                       for r in rows})
    assert sorted(calls) == expected and len(calls) == len(expected)  # each group once
    assert examples[4].origin == f"{source.files[1]} row 0"


@pytest.mark.parametrize("layout", ["root", "single"])
def test_parquet_shards_in_the_root_or_one_file_per_split(tmp_path, layout):
    written = write_hf_parquet(tmp_path, splits_of(9, 5), CLASSES, shards=3, layout=layout,
                               image_format="JPEG")
    (tmp_path / "README.md").write_text("# a dataset card\n")
    info = open_dataset(str(tmp_path))
    assert sorted(info.splits) == ["test", "train"]
    assert len(info.splits["train"].files) == (3 if layout == "root" else 1)
    assert read_all(info.splits["train"]) == written["train"]
    single = open_dataset(info.splits["test"].files[0]) if layout == "single" else None
    if single is not None:  # a lone `{split}.parquet` file
        assert list(single.splits) == ["test"] and read_all(single.splits["test"]) == \
            written["test"]


# ---- save_to_disk -----------------------------------------------------------------------------

def test_save_to_disk_dict_splits_classnames_and_rows(tmp_path, monkeypatch):
    written = write_save_to_disk(tmp_path, splits_of(25, 7), CLASSES, shards=2, batch_size=4)
    info = open_dataset(str(tmp_path))
    assert info.kind == "arrow" and list(info.splits) == ["train", "test"]
    assert info.classnames == tuple(CLASSES)
    train = info.splits["train"]
    assert train.file_rows == (13, 12) and info.splits["test"].num_rows == 7
    assert read_all(train) == written["train"] and read_all(info.splits["test"]) == \
        written["test"]

    decoded = []  # (file, first row of the batch) of every batch turned into examples
    original = datasets._examples

    def spy(source, data, indices, file, offset, first):
        decoded.append((os.path.basename(file), offset))
        return original(source, data, indices, file, offset, first)

    monkeypatch.setattr(datasets, "_examples", spy)
    rows = [1, 2, 12, 13, 24]  # file 0: rows 0-12 in batches of 4; file 1: rows 13-24
    examples = list(read_examples(train, rows))
    assert [(e.image, e.label) for e in examples] == [written["train"][r] for r in rows]
    assert decoded == [("data-00000-of-00002.arrow", 0), ("data-00000-of-00002.arrow", 12),
                       ("data-00001-of-00002.arrow", 0), ("data-00001-of-00002.arrow", 8)]
    assert examples[-1].origin == f"{train.files[1]} row 11"


def test_save_to_disk_follows_state_json_file_order(tmp_path):
    written = write_save_to_disk(tmp_path, {"test": labelled(10, 3)}, CLASSES, shards=2)
    state_path = tmp_path / "test" / "state.json"
    state = json.loads(state_path.read_text())
    state["_data_files"].reverse()
    state_path.write_text(json.dumps(state))
    source = open_dataset(str(tmp_path)).splits["test"]
    assert source.file_rows == (5, 5)
    assert read_all(source) == written["test"][5:] + written["test"][:5]


def test_bare_saved_dataset_is_one_split(tmp_path):
    written = write_save_to_disk(tmp_path / "saved", {"validation": labelled(6, 3)}, CLASSES,
                                 as_dict=False)
    info = open_dataset(str(tmp_path / "saved"))
    assert list(info.splits) == ["validation"] and info.classnames == tuple(CLASSES)
    assert read_all(info.splits["validation"]) == written["validation"]
    assert list(open_dataset(str(tmp_path / "saved"), split="val").splits) == ["val"]


# ---- ImageFolder ------------------------------------------------------------------------------

def torchvision_samples(split_dir: str) -> list[tuple[str, int]]:
    """torchvision's find_classes + make_dataset, restated: classes are sorted folder names,
    files walked with sorted(os.walk(...)) and sorted names, kept by extension."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    found = []
    for label, name in enumerate(classes):
        for folder, _, names in sorted(os.walk(os.path.join(split_dir, name))):
            found += [(os.path.join(folder, f), label) for f in sorted(names)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def test_image_folder_matches_torchvision_order_and_labels(tmp_path):
    written = write_image_folder(tmp_path, splits_of(14, 6), CLASSES, subfolder_every=2)
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    upper = encode(sample_images(1, seed=9)[0], "JPEG")
    (tmp_path / "train" / "mango" / "ZZ.JPG").write_bytes(upper)
    info = open_dataset(str(tmp_path))
    assert info.kind == "imagefolder" and info.classnames == ("apple", "mango", "zebra")
    for split in ("train", "test"):
        source = info.splits[split]
        reference = torchvision_samples(str(tmp_path / split))
        assert list(zip(source.files, source.labels)) == reference
        on_disk = {os.path.join(str(tmp_path), rel): data for rel, data, _ in written[split]}
        on_disk[str(tmp_path / "train" / "mango" / "ZZ.JPG")] = upper
        examples = list(read_examples(source, range(source.num_rows)))
        assert [(e.image, e.label, e.origin) for e in examples] == \
            [(on_disk[path], label, path) for path, label in reference]
    assert info.splits["train"].num_rows == 15  # 14 written + ZZ.JPG, notes.txt skipped
    picked = list(read_examples(info.splits["test"], [1, 4]))
    assert [e.row for e in picked] == [1, 4]


# ---- object stores ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["parquet", "arrow", "imagefolder"])
def test_datasets_on_an_object_store(kind, tmp_path, s3_prefix):
    local = tmp_path / "local"
    write = {"parquet": lambda: write_hf_parquet(local, splits_of(), CLASSES, row_group_size=4),
             "arrow": lambda: write_save_to_disk(local, splits_of(), CLASSES, shards=2,
                                                 batch_size=4),
             "imagefolder": lambda: write_image_folder(local, splits_of(), CLASSES)}[kind]
    write()
    storage.copy_tree(str(local), s3_prefix)
    remote = open_dataset(s3_prefix)
    reference = open_dataset(str(local))
    assert remote.kind == kind and remote.classnames == reference.classnames
    assert all(f.startswith(s3_prefix + "/") for s in remote.splits.values() for f in s.files)
    rows = [0, 5, 12, 13, 22]
    for split in ("train", "test"):
        ours = remote.splits[split]
        assert ours.num_rows == reference.splits[split].num_rows
        wanted = [r for r in rows if r < ours.num_rows]
        assert [(e.image, e.label) for e in read_examples(ours, wanted)] == \
            [(e.image, e.label) for e in read_examples(reference.splits[split], wanted)]


# ---- errors the user fixes --------------------------------------------------------------------

def test_missing_and_empty_locations(tmp_path):
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "nope"))
    one_line_error(excinfo, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "empty"))
    assert "empty" in one_line_error(excinfo, str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "other"))
    assert "weights.bin" in one_line_error(excinfo, str(tmp_path / "other"))
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "other"), kind="tfrecord")
    one_line_error(excinfo, str(tmp_path / "other"))


def _parquet(path, table: pa.Table) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def test_parquet_with_wrong_columns(tmp_path):
    images = pa.array([{"bytes": b"x", "path": "a.png"}])
    _parquet(tmp_path / "a" / "data" / "test-00000-of-00001.parquet",
             pa.table({"img": images, "label": [0]}))
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "a"))
    assert "'image'" in one_line_error(excinfo, str(tmp_path / "a" / "data"))
    _parquet(tmp_path / "b" / "test.parquet", pa.table({"image": images, "label": ["cat"]}))
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "b"))
    assert "integer" in one_line_error(excinfo, str(tmp_path / "b" / "test.parquet"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "c"))
    one_line_error(excinfo, str(tmp_path / "c" / "train.parquet"))


def test_null_image_bytes_name_the_row(tmp_path):
    path = tmp_path / "d" / "test.parquet"
    images = pa.array([{"bytes": b"png", "path": "a"}, {"bytes": None, "path": "b.png"}],
                      type=datasets_image_type())
    _parquet(path, pa.table({"image": images, "label": pa.array([0, 1], pa.int64())}))
    source = open_dataset(str(tmp_path / "d")).splits["test"]
    assert next(read_examples(source, [0])).image == b"png"
    with pytest.raises(InputError) as excinfo:
        list(read_examples(source, [1]))
    assert one_line_error(excinfo, str(path)) == f"{path} row 1: no image bytes"


def datasets_image_type() -> pa.DataType:
    return pa.struct({"bytes": pa.binary(), "path": pa.string()})


def test_arrow_directories_without_state_json(tmp_path):
    write_save_to_disk(tmp_path / "dict", {"train": labelled(3, 3)}, CLASSES)
    os.remove(tmp_path / "dict" / "train" / "state.json")
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "dict"))
    assert "state.json" in one_line_error(excinfo, str(tmp_path / "dict" / "train"))
    write_save_to_disk(tmp_path / "bare", {"train": labelled(3, 3)}, CLASSES, as_dict=False)
    os.remove(tmp_path / "bare" / "state.json")
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path / "bare"), kind="arrow")
    assert "state.json" in one_line_error(excinfo, str(tmp_path / "bare"))


def test_image_folder_split_without_class_folders(tmp_path):
    write_image_folder(tmp_path, {"train": labelled(4, 2)}, CLASSES)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "a.png").write_bytes(encode(sample_images(1)[0]))
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path))
    assert "class folders" in one_line_error(excinfo, str(tmp_path / "test"))


def test_image_folder_splits_with_different_classes(tmp_path):
    write_image_folder(tmp_path, {"train": labelled(6, 3), "test": labelled(4, 2)}, CLASSES)
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path))
    one_line_error(excinfo, str(tmp_path))


def test_file_uri_reads_like_the_local_path(tmp_path):
    written = write_hf_parquet(tmp_path, splits_of(), CLASSES, row_group_size=4)
    assert storage.is_uri(tmp_path.as_uri())
    info = open_dataset(tmp_path.as_uri())
    assert info.splits["train"].files[0].startswith(tmp_path.as_uri() + "/data/")
    assert read_all(info.splits["train"]) == written["train"]


def test_rows_must_ascend_within_the_split(tmp_path):
    write_hf_parquet(tmp_path, splits_of(), CLASSES)
    source = open_dataset(str(tmp_path)).splits["test"]
    for rows in ([3, 1], [2, 2], [-1], [source.num_rows]):
        with pytest.raises(ValueError):
            list(read_examples(source, rows))
    assert list(read_examples(source, [])) == []


def test_dataset_dict_naming_a_missing_split(tmp_path):
    write_save_to_disk(tmp_path, {"train": labelled(3, 3)}, CLASSES)
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "val"]}))
    with pytest.raises(InputError) as excinfo:
        open_dataset(str(tmp_path))
    assert "state.json" in one_line_error(excinfo, str(tmp_path / "val"))

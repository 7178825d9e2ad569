"""Edge cases of the readers, splits and samplers found by fuzzing (each test failed before its fix): hidden
folders inside class folders, VTAB-1k class counts per task, 16-bit and float images, boolean subset masks,
damaged few-shot caches, negative and sparse label ids, malformed label lists, ImageNet's released flat val."""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fsosr.data import (CorruptImageError, ImageFolderDataset, ImageNet, MalformedDataError, VTAB1k, build_dataset)
from fsosr.data.readers.base import load_image
from fsosr.data.readers.cifar import CIFAR10
from fsosr.data.readers.fewshot import MiniImageNet
from fsosr.data.readers.folders import scan_image_folder
from fsosr.data.samplers import cached_few_shot_indices, class_incremental_tasks, few_shot_indices, seen_classes
from fsosr.data.splits import remap_labels


def test_hidden_folders_inside_class_folders_are_skipped(tmp_path, formats):
    formats.png(str(tmp_path / "cat" / "a.png"), 1)
    formats.png(str(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png"), 2)
    formats.png(str(tmp_path / "cat" / "sub" / "b.png"), 3)
    formats.png(str(tmp_path / "dog" / ".cache" / "only-hidden.png"), 4)
    formats.png(str(tmp_path / "dog" / "c.png"), 5)
    paths, labels, classes = scan_image_folder(tmp_path)
    assert [os.path.relpath(p, tmp_path) for p in paths] == ["cat/a.png", os.path.join("cat", "sub", "b.png"),
                                                             "dog/c.png"]
    assert labels == [0, 0, 1] and classes == ["cat", "dog"]
    os.remove(tmp_path / "dog" / "c.png")            # a class holding only hidden copies holds no images
    with pytest.raises(MalformedDataError, match="holds no image files"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(MalformedDataError, match="is a file"):
        scan_image_folder(tmp_path / "cat" / "a.png")


def _vtab_task(root, task, formats, lists):
    for name, lines in lists.items():
        for index, (_, _) in enumerate(lines):
            formats.png(str(root / task / "images" / f"{name}{index}.png"), index)
        (root / task / f"{name}.txt").write_text(
            "".join(f"images/{name}{index}.png {label}\n" for index, (_, label) in enumerate(lines)))


def test_vtab_class_count_is_the_tasks_not_the_splits(tmp_path, formats):
    lists = {"train800": [(0, 0), (1, 1), (2, 2)], "val200": [(0, 0)]}
    _vtab_task(tmp_path, "sun397", formats, lists)
    assert len(VTAB1k(tmp_path, "sun397", "val").classes) == 397            # the published count, every split
    assert len(VTAB1k(tmp_path, "sun397", "train").classes) == 397
    _vtab_task(tmp_path, "my_task", formats, lists)                        # another name: all list files counted
    assert len(VTAB1k(tmp_path, "my_task", "val").classes) == 3
    assert len(VTAB1k(tmp_path, "my_task", "val", num_classes=7).classes) == 7
    with pytest.raises(MalformedDataError, match="outside the task's 2 classes"):
        VTAB1k(tmp_path, "my_task", "train", num_classes=2)
    for bad in ("-1", "--3", "\u00b2", "1.5"):
        (tmp_path / "my_task" / "val200.txt").write_text(f"images/val2000.png {bad}\n")
        with pytest.raises(MalformedDataError, match="non-negative integer label"):
            VTAB1k(tmp_path, "my_task", "val")
    (tmp_path / "my_task" / "val200.txt").write_bytes("\ufeffimages/val2000.png 0\n".encode("utf-8"))  # a BOM
    assert VTAB1k(tmp_path, "my_task", "val").path(0) == str(tmp_path / "my_task" / "images" / "val2000.png")
    with pytest.raises(ValueError, match="needs task="):
        build_dataset("vtab-1k", root=tmp_path, split="val")


def test_sixteen_bit_images_keep_their_range_and_float_ones_raise(tmp_path):
    values = np.array([[0, 200, 1000, 40000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    Image.fromarray(values).save(tmp_path / "g16.tif")
    for name in ("g16.png", "g16.tif"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image)[0, :, 0], values[0] >> 8)
    Image.fromarray(np.array([[0, 100, 255]], np.int32)).save(tmp_path / "i8.tif")      # 8-bit data in mode I
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "i8.tif"))[0, :, 1], [0, 100, 255])
    Image.fromarray(np.array([[0, 5, 70000]], np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(CorruptImageError, match="32-bit integer") as error:
        load_image(tmp_path / "i32.tif")
    assert str(tmp_path / "i32.tif") in str(error.value)
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(CorruptImageError, match="floating-point"):
        load_image(tmp_path / "f.tif")


def test_subset_refuses_a_boolean_mask(tmp_path, formats):
    for i in range(3):
        formats.png(str(tmp_path / "a" / f"{i}.png"), i)
    dataset = ImageFolderDataset(tmp_path)
    with pytest.raises(TypeError, match="boolean mask"):
        dataset.subset(np.array([True, False, True]))
    assert len(dataset.subset(np.flatnonzero([True, False, True]))) == 2


def test_few_shot_seeds_and_damaged_caches(tmp_path):
    labels = np.repeat(np.arange(4), 5)
    np.testing.assert_array_equal(few_shot_indices(labels, 2, np.int64(3)), few_shot_indices(labels, 2, 3))
    path = tmp_path / "shot_2-seed_3.json"
    expected = few_shot_indices(labels, 2, 3)
    for content in (b"[]", b"null", b'"x"', b"\xff\xfe\x00", b'{"labels_sha256": "x", "indices": ["a"]}'):
        path.write_bytes(content)
        with pytest.warns(UserWarning):
            np.testing.assert_array_equal(cached_few_shot_indices(labels, 2, 3, tmp_path), expected)
    record = json.loads(path.read_text())
    record["indices"] = [0, 99]                       # indices beyond the labels: recomputed, not returned
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="unreadable"):
        np.testing.assert_array_equal(cached_few_shot_indices(labels, 2, 3, tmp_path), expected)
    with pytest.raises(TypeError, match="int seed"):
        import random  # noqa: PLC0415
        cached_few_shot_indices(labels, 2, random.Random(3), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["shot_2-seed_3.json"]          # no temporary file left behind


def test_class_incremental_bounds():
    with pytest.raises(ValueError, match="do not split"):
        class_incremental_tasks(range(10), 20, 5)
    tasks = class_incremental_tasks(range(10), 4, 3)
    with pytest.raises(IndexError, match="3 tasks"):
        seen_classes(tasks, 99)
    with pytest.raises(IndexError):
        seen_classes(tasks, -1)


def test_remap_labels_takes_negative_and_sparse_ids():
    np.testing.assert_array_equal(remap_labels([0, -1, 3], [3, 0], missing=-1), [1, -1, 0])
    np.testing.assert_array_equal(remap_labels([0, 1, 2], [-1, 2], missing=-7), [-7, -7, 1])
    np.testing.assert_array_equal(remap_labels([-1, -1], [-1]), [0, 0])
    np.testing.assert_array_equal(remap_labels([10**12, 5], [5, 10**12]), [1, 0])   # no table of 10**12 entries
    np.testing.assert_array_equal(remap_labels([[4, 2], [2, 4]], [2, 4]), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(remap_labels([3], [], missing=-1), [-1])


def test_malformed_label_lists_are_malformed_data(tmp_path, formats):
    formats.cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    for labels, match in ((["a", "b"], "integer labels"), (None, "integer labels"), ([0.0, 1.5], "integer labels"),
                          ([[0], [1]], "flat list")):
        with open(folder / "test_batch", "wb") as handle:
            pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": labels}, handle)
        with pytest.raises(MalformedDataError, match=match):
            CIFAR10(tmp_path, "test")
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": None}, handle)
    with pytest.raises(MalformedDataError, match="list of class names"):
        CIFAR10(tmp_path, "test")
    pack = {"data": np.zeros((2, 84, 84, 3), np.uint8), "labels": [64, 65], "catname2label": {"a": [64]}}
    with open(tmp_path / "miniImageNet_category_split_val.pickle", "wb") as handle:
        pickle.dump(pack, handle)
    assert MiniImageNet(tmp_path, "val").classes == ["64", "65"]          # an odd optional mapping is ignored


def test_imagenet_flat_val_says_to_refolder(tmp_path, formats):
    formats.png(str(tmp_path / "images" / "val" / "ILSVRC2012_val_00000001.JPEG"), 1)
    (tmp_path / "classnames.txt").write_text("n014 tench\n")
    with pytest.raises(MalformedDataError, match="one sub-folder per wnid"):
        ImageNet(tmp_path, "val")
    formats.png(str(tmp_path / "images" / "train" / "n014" / "a.JPEG"), 2)
    (tmp_path / "classnames.txt").write_bytes("\ufeffn014 tench\n".encode("utf-8"))   # a BOM is not part of n014
    assert ImageNet(tmp_path, "train").classes == ["tench"]

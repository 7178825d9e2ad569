"""RFS/TANE few-shot files (miniImageNet, CIFAR-FS, tieredImageNet) and MoSA's FGVC / VTAB-1k layouts."""
import os
import pickle

import numpy as np
import pytest

from fsosr.data import (CIFARFS, FGVCDataset, MalformedDataError, MiniImageNet, MissingDataError, TieredImageNet,
                        VTAB1k, build_dataset)
from fsosr.data.readers.fewshot import MINI_IMAGENET_FILES


def test_mini_imagenet_pickle(tmp_path, formats):
    labels = [64, 64, 65, 66, 65, 66]  # the val pickle's ids start at 64 in the released files
    images = formats.fewshot_pickle(tmp_path / "miniImageNet_category_split_val.pickle", labels, 84, with_names=True)
    val = MiniImageNet(tmp_path, "val")
    np.testing.assert_array_equal(val.targets, [0, 0, 1, 2, 1, 2])
    np.testing.assert_array_equal(val.label_ids, [64, 65, 66])
    assert val.classes == ["n00000064", "n00000065", "n00000066"]
    image, label = val[4]
    assert image.size == (84, 84) and label == 1
    np.testing.assert_array_equal(np.asarray(image), images[4])
    assert build_dataset("miniimagenet", root=tmp_path, split="val").targets.tolist() == val.targets.tolist()
    assert MINI_IMAGENET_FILES["train"] == "miniImageNet_category_split_train_phase_train.pickle"


def test_mini_imagenet_errors_name_the_file(tmp_path, formats):
    with pytest.raises(MissingDataError) as error:
        MiniImageNet(tmp_path, "train")
    message = str(error.value)
    assert str(tmp_path / "miniImageNet_category_split_train_phase_train.pickle") in message
    assert "miniImageNet_category_split_test.pickle" in message  # the layout lists every expected file
    path = tmp_path / "miniImageNet_category_split_test.pickle"
    with open(path, "wb") as handle:
        pickle.dump({"data": np.zeros((2, 84, 84, 3), np.uint8)}, handle)
    with pytest.raises(MalformedDataError, match="'labels'") as error:
        MiniImageNet(tmp_path, "test")
    assert str(path) in str(error.value)
    with open(path, "wb") as handle:
        pickle.dump({"data": np.zeros((2, 84, 84), np.float32), "labels": [0, 1]}, handle)
    with pytest.raises(MalformedDataError, match=r"uint8 \[N, H, W, 3\]"):
        MiniImageNet(tmp_path, "test")


def test_cifar_fs_both_file_names(tmp_path, formats):
    images = formats.fewshot_pickle(tmp_path / "test.pickle", [90, 80, 90, 85], 32)
    test = CIFARFS(tmp_path, "test")
    np.testing.assert_array_equal(test.targets, [2, 0, 2, 1])  # ranked: 80 -> 0, 85 -> 1, 90 -> 2
    np.testing.assert_array_equal(np.asarray(test[3][0]), images[3])
    formats.fewshot_pickle(tmp_path / "CIFAR_FS_val.pickle", [1, 2], 32)
    assert CIFARFS(tmp_path, "val").targets.tolist() == [0, 1]
    with pytest.raises(MissingDataError, match="train.pickle"):
        CIFARFS(tmp_path, "train")


def test_tiered_imagenet_npz(tmp_path):
    features = np.arange(3 * 84 * 84 * 3, dtype=np.int64).reshape(3, 84, 84, 3).astype(np.uint8)
    np.savez(tmp_path / "few-shot-test.npz", features=features, targets=np.array([351, 352, 351]))
    test = TieredImageNet(tmp_path, "test")
    np.testing.assert_array_equal(test.targets, [0, 1, 0])
    np.testing.assert_array_equal(np.asarray(test[2][0]), features[2])
    np.savez(tmp_path / "few-shot-val.npz", images=features)
    with pytest.raises(MalformedDataError, match="features") as error:
        TieredImageNet(tmp_path, "val")
    assert str(tmp_path / "few-shot-val.npz") in str(error.value)
    (tmp_path / "few-shot-train.npz").write_bytes(b"not a zip")
    with pytest.raises(MalformedDataError, match="cannot read npz"):
        TieredImageNet(tmp_path, "train")


def test_fgvc_json_layout(tmp_path, formats):
    formats.png(str(tmp_path / "images" / "001.Black_footed" / "a.jpg"), 1)
    formats.png(str(tmp_path / "images" / "002.Laysan" / "b.png"), 60)
    formats.json(tmp_path / "train.json", {"002.Laysan/b.png": 7, "001.Black_footed/a.jpg": 3})
    train = FGVCDataset(tmp_path, "train")
    np.testing.assert_array_equal(train.label_ids, [3, 7])
    np.testing.assert_array_equal(train.targets, [0, 1])  # sorted paths, ranked labels
    np.testing.assert_array_equal(np.asarray(train[1][0])[0, 0], [60, 61, 62])
    formats.json(tmp_path / "val.json", {"missing.jpg": 0})
    with pytest.raises(MissingDataError, match="missing.jpg"):
        FGVCDataset(tmp_path, "val")
    (tmp_path / "test.json").write_text("{not json")
    with pytest.raises(MalformedDataError, match="not valid JSON") as error:
        FGVCDataset(tmp_path, "test")
    assert str(tmp_path / "test.json") in str(error.value)


def test_vtab_list_files(tmp_path, formats):
    task = tmp_path / "dtd"
    formats.png(str(task / "images" / "0.png"), 3)
    formats.png(str(task / "images" / "1.png"), 9)
    (task / "train800val200.txt").write_text("images/1.png 4\nimages/0.png 0\n")
    trainval = build_dataset("vtab-1k", root=tmp_path, split="trainval", task="dtd")
    assert trainval.targets.tolist() == [4, 0] and len(trainval.classes) == 47     # DTD's published count
    np.testing.assert_array_equal(np.asarray(trainval[0][0])[0, 0], [9, 10, 11])
    (task / "test.txt").write_text("images/0.png zero\n")
    with pytest.raises(MalformedDataError, match="line 1") as error:
        VTAB1k(tmp_path, "dtd", "test")
    assert os.path.join(str(task), "test.txt") in str(error.value)
    with pytest.raises(MissingDataError, match="val200.txt"):
        VTAB1k(tmp_path, "dtd", "val")

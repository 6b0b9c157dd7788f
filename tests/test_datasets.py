"""load_dataset: MNIST idx files (plain and .gz) and CIFAR-10 pickles written to tmp_path,
normalization, the missing-folder error (nothing downloaded), bad input."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from scaleinv_kernels.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    load_dataset,
    load_mnist5k,
    read_idx,
)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(root, n_train=6, n_test=4, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        for kind, a in (("images-idx3", arrays[prefix][0]), ("labels-idx1", arrays[prefix][1])):
            path = raw / f"{prefix}-{kind}-ubyte"
            data = _idx_bytes(a)
            if gz:
                with gzip.open(f"{path}.gz", "wb") as f:
                    f.write(data)
            else:
                path.write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    x_train, y_train, x_test, y_test = load_dataset("mnist", tmp_path)
    assert x_train.shape == (6, 1, 28, 28) and x_test.shape == (4, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    for x, y, (images, labels) in ((x_train, y_train, arrays["train"]),
                                   (x_test, y_test, arrays["t10k"])):
        expected = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
        assert torch.equal(x[:, 0], torch.from_numpy(expected.astype(np.float32)))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_cifar10_from_pickles(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 3)]
        batches[name] = (data, labels)
        with open(folder / name, "wb") as f:  # bytes keys, as the real files (python 2)
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, f)
    x_train, y_train, x_test, y_test = load_dataset("cifar10", str(tmp_path))
    assert x_train.shape == (15, 3, 32, 32) and x_test.shape == (3, 3, 32, 32)
    assert y_train.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert y_test.tolist() == batches["test_batch"][1]
    # Channel c of image 0 of batch 2 = bytes [c*1024, (c+1)*1024) of its row, normalized.
    row = batches["data_batch_2"][0][0]
    for c in range(3):
        expected = (row[c * 1024:(c + 1) * 1024].reshape(32, 32) / 255.0
                    - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        torch.testing.assert_close(x_train[3, c], torch.from_numpy(expected).float())


def test_missing_folders_name_the_expected_paths_and_download_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded") as err:
        load_dataset("mnist", tmp_path)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in str(err.value)
    assert "t10k-labels-idx1-ubyte" in str(err.value)
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded") as err:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_5") in str(err.value)
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_partial_mnist_folder_is_an_error(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_mnist5k_and_bad_input(tmp_path):
    assert all(torch.equal(a, b) for a, b in zip(load_dataset("mnist5k"), load_mnist5k()))
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("mnist")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((2, 3)))[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(short)

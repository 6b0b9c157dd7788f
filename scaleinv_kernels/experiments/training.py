"""Training and evaluation helpers shared by the experiments (data, models, accuracy).

Kept apart from :mod:`.common`, which holds the experiments' infrastructure (run context,
checkpoints, result and figure files): this module is about the networks themselves.

* :func:`load_data`: the run's data set, cut to its first n images;
* :func:`normalized_mlp`: the BatchNorm MLP, scale-invariant in every trainable tensor;
  :func:`model_factory` builds it (or ``normalized_cnn``) for a data set's input shape;
* :func:`accuracy`, :func:`recomputed_bn_accuracy`: test accuracy of one model, or of the
  weight average of several, with the BatchNorm statistics recomputed on training data
  (so the number measures the weights, not stale running averages);
* :func:`member_accuracies`: the same for every member of an
  :class:`~scaleinv_kernels.ensemble.Ensemble`, one member at a time;
* :func:`trainable_norms`: ‖w_l‖ of every trainable tensor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from scaleinv_kernels.data import load_dataset
from scaleinv_kernels.ensemble.weight_space import average_weights
from scaleinv_kernels.experiments.common import RunContext
from scaleinv_kernels.scale_invariance import freeze_last_layer, normalized_cnn

MODELS = ("mlp", "cnn")


def load_data(ctx: RunContext, n_train: int | None = None, n_test: int | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``ctx``'s data set, cut to its first ``n_train`` / ``n_test`` images (None: all)."""
    for n, what in ((n_train, "n_train"), (n_test, "n_test")):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"{ctx.name}: {what} must be a positive int or None, got {n!r}")
    x, y, x_test, y_test = load_dataset(ctx.data, ctx.data_root, ctx.device)
    if n_train is not None:
        x, y = x[:n_train], y[:n_train]
    if n_test is not None:
        x_test, y_test = x_test[:n_test], y_test[:n_test]
    return x, y, x_test, y_test


def normalized_mlp(d_in: int = 784, hidden: int = 128, num_classes: int = 10) -> nn.Module:
    """Flatten → two hidden layers ``Linear(bias=False)`` → ``BatchNorm1d(affine=False)``
    → ReLU → a frozen random ``Linear(hidden → num_classes)``: scale-invariant in both
    trainable weights (the only trainable tensors)."""
    for value, what in ((d_in, "d_in"), (hidden, "hidden"), (num_classes, "num_classes")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"normalized_mlp: {what} must be a positive int, got {value!r}")
    model = nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(d_in, hidden, bias=False), bn1=nn.BatchNorm1d(hidden, affine=False),
        relu1=nn.ReLU(),
        fc2=nn.Linear(hidden, hidden, bias=False), bn2=nn.BatchNorm1d(hidden, affine=False),
        relu2=nn.ReLU(),
        out=nn.Linear(hidden, num_classes)))
    freeze_last_layer(model)
    return model


def model_factory(kind: str, x: Tensor, hidden: int | None = None) -> Callable[[], nn.Module]:
    """A factory of fresh scale-invariant models for inputs shaped like ``x`` [N, C, H, W]:
    ``"mlp"``: :func:`normalized_mlp` (C·H·W inputs, ``hidden`` units);
    ``"cnn"``: ``normalized_cnn`` (C input channels)."""
    if kind not in MODELS:
        raise ValueError(f"model_factory: unknown model {kind!r}; choose one of {MODELS}")
    if x.dim() != 4:
        raise ValueError(f"model_factory: x must be images [N, C, H, W], got shape "
                         f"{tuple(x.shape)}")
    if kind == "mlp":
        if hidden is None:
            raise ValueError("model_factory: the mlp needs hidden (units per layer)")
        d_in = int(x[0].numel())
        return lambda: normalized_mlp(d_in, hidden)
    in_ch = int(x.shape[1])
    return lambda: normalized_cnn(in_channels=in_ch)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` in eval mode (its train/eval mode is restored)."""
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"accuracy: need as many labels as inputs (> 0), got {len(x)} "
                         f"and {len(y)}")
    was = model.training
    model.eval()
    try:
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
                      for i in range(0, len(x), batch))
    finally:
        model.train(was)
    return correct / len(x)


def recomputed_bn_accuracy(models: Sequence[nn.Module | Mapping[str, Tensor]],
                           template: nn.Module, x_train: Tensor, x_test: Tensor,
                           y_test: Tensor, batch_size: int = 500) -> float:
    """Test accuracy of the weight average of ``models`` (one model: itself) with the
    BatchNorm statistics recomputed on ``x_train`` (``average_weights``)."""
    avg = average_weights(list(models), data=x_train, batch_size=batch_size,
                          template=template)
    return accuracy(avg, x_test, y_test)


def member_accuracies(ens, x_train: Tensor, x_test: Tensor, y_test: Tensor,
                      members: Sequence[int] | None = None) -> list[float]:
    """:func:`recomputed_bn_accuracy` of each member of the ensemble ``ens`` (``members``:
    local indices, default all), each with its own BatchNorm statistics recomputed."""
    members = range(ens.n_members) if members is None else members
    out = []
    for i in members:
        model = ens.member(i)
        out.append(recomputed_bn_accuracy([model], model, x_train, x_test, y_test))
    return out


def trainable_norms(model: nn.Module) -> Tensor:
    """‖w_l‖ of every trainable tensor (float64, in ``named_parameters`` order)."""
    return torch.stack([p.detach().double().norm() for p in model.parameters()
                        if p.requires_grad])

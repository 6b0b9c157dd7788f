"""normalized_cnn is scale-invariant in every trainable tensor; freeze_last_layer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.data import load_mnist5k
from scaleinv_kernels.scale_invariance import freeze_last_layer, normalized_cnn


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = normalized_cnn().train()
    x, y, _, _ = load_mnist5k()
    return model, x[:64], y[:64]


def test_structure_only_conv_weights_train():
    model, _, _ = _model_and_batch()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["conv1.weight", "conv2.weight", "conv3.weight"]
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [16, 32, 32]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 and not any(m.affine for m in norms)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_loss_unchanged_when_trainable_weights_are_scaled():
    model, x, y = _model_and_batch()
    with torch.no_grad():
        before = F.cross_entropy(model(x), y)
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.7)
        after = F.cross_entropy(model(x), y)
    assert before.item() > 1.0  # a real loss, not a degenerate zero
    assert abs(after.item() - before.item()) <= 1e-5 * before.item()


def test_gradient_is_orthogonal_to_each_trainable_weight():
    model, x, y = _model_and_batch()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
            continue
        w, g = p.detach().double().flatten(), p.grad.double().flatten()
        assert g.norm() > 0, name
        cos = torch.dot(w, g) / (w.norm() * g.norm())
        assert abs(cos.item()) < 1e-4, (name, cos.item())


def test_last_layer_frozen_at_init():
    model, x, y = _model_and_batch()
    fc = model.fc
    assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (32, 10)
    assert not fc.weight.requires_grad and not fc.bias.requires_grad
    w0 = fc.weight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(fc.weight, w0)


def test_normalized_cnn_options():
    model = normalized_cnn(channels=(4, 8), num_classes=3, in_channels=3)
    assert model(torch.randn(5, 3, 16, 16)).shape == (5, 3)
    with pytest.raises(ValueError, match="at least one width"):
        normalized_cnn(channels=())


def test_freeze_last_layer_freezes_the_last_linear():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    last = freeze_last_layer(model)
    assert last is model[2]
    assert not last.weight.requires_grad and not last.bias.requires_grad
    assert model[0].weight.requires_grad and model[0].bias.requires_grad


def test_freeze_last_layer_without_linear_raises():
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        freeze_last_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))

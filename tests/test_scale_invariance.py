"""normalized_cnn is scale-invariant in every trainable tensor; freeze_last_layer; the
numerical check (check_scale_invariance) and make_scale_invariant."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaleinv_kernels.data import load_mnist5k
from scaleinv_kernels.scale_invariance import (
    check_scale_invariance,
    freeze_last_layer,
    make_scale_invariant,
    normalized_cnn,
)


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
    with pytest.raises(ValueError, match="norm must be 'batch' or 'group'"):
        normalized_cnn(norm="layer")
    with pytest.raises(ValueError, match="num_groups=3 must divide every width"):
        normalized_cnn(norm="group", num_groups=3)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_groupnorm_cnn_is_scale_invariant_in_both_modes(train):
    """norm="group": GroupNorm(4, affine=False) blocks named gn<i>; per-sample statistics,
    so scaling a conv weight leaves the output unchanged in eval mode too."""
    torch.manual_seed(0)
    model = normalized_cnn(norm="group").train(train)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert [m.num_groups for m in norms] == [4, 4, 4] and not any(m.affine for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert hasattr(model, "gn1") and not hasattr(model, "bn1")
    x, y, _, _ = load_mnist5k()
    with torch.no_grad():
        before = F.cross_entropy(model(x[:64]), y[:64])
        model.conv2.weight.mul_(5.0)
        after = F.cross_entropy(model(x[:64]), y[:64])
    assert before.item() > 1.0
    assert abs(after.item() - before.item()) <= 1e-5 * before.item()


def test_freeze_last_layer_freezes_the_last_linear():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    last = freeze_last_layer(model)
    assert last is model[2]
    assert not last.weight.requires_grad and not last.bias.requires_grad
    assert model[0].weight.requires_grad and model[0].bias.requires_grad


def test_freeze_last_layer_without_linear_raises():
    with pytest.raises(ValueError, match="Sequential has no nn.Linear"):
        freeze_last_layer(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


# ---- check_scale_invariance / make_scale_invariant -----------------------------------------
def _mixed_net(seed=0):
    """0.weight and 3.weight feed BatchNorm(affine=False) (invariant); 3.bias sits right
    before a BatchNorm, whose mean subtraction cancels it (the loss does not depend on it);
    4.* are the affine parameters of a BatchNorm and 6.* a trainable classifier (not
    invariant; 4.bias starts at zero)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8, affine=False),
                         nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def _mixed_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,),
                                                                               generator=g)


def test_check_passes_for_normalized_cnn_and_leaves_the_model_alone():
    model, x, y = _model_and_batch()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_scale_invariance(model, F.cross_entropy, (x, y))
    assert report.ok and report.failures == []
    assert [p.name for p in report.params] == ["conv1.weight", "conv2.weight", "conv3.weight"]
    for p in report.params:
        assert len(p.loss_rel_change) == 3 and max(p.loss_rel_change) < 1e-5
        assert abs(p.grad_weight_cosine) < 1e-4
    assert not model.training  # mode, weights and running statistics untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert "OK" in str(report) and "conv2.weight" in str(report)


def test_check_names_exactly_the_non_invariant_tensors():
    x, y = _mixed_batch()
    report = check_scale_invariance(_mixed_net(), F.cross_entropy, (x, y))
    assert not report.ok
    assert report.failures == ["4.weight", "4.bias", "6.weight", "6.bias"]
    by_name = {p.name: p for p in report.params}
    assert by_name["4.bias"].zero  # zero at init: scaling cannot show anything
    assert max(by_name["4.weight"].loss_rel_change) > 0.1
    assert max(by_name["0.weight"].loss_rel_change) < 1e-4  # BatchNorm eps: ~1e-5
    text = str(report)
    assert "FAILED for 4.weight, 4.bias, 6.weight, 6.bias" in text
    assert "zero tensor" in text and "NOT scale-invariant" in text


def test_check_bad_input():
    x, y = _mixed_batch()
    net = _mixed_net()
    with pytest.raises(TypeError, match="pair"):
        check_scale_invariance(net, F.cross_entropy, x)
    with pytest.raises(ValueError, match="scales must be positive"):
        check_scale_invariance(net, F.cross_entropy, (x, y), scales=(0.0,))
    with pytest.raises(ValueError, match="rtol"):
        check_scale_invariance(net, F.cross_entropy, (x, y), rtol=0)
    with pytest.raises(TypeError, match="scalar tensor"):
        check_scale_invariance(net, lambda o, t: o, (x, y))


def test_make_scale_invariant_freezes_the_classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8, affine=False),
                        nn.ReLU(), nn.Linear(8, 3)).double()
    x, _ = _mixed_batch()
    assert make_scale_invariant(net, x) is net
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["0.weight"]


def test_make_scale_invariant_names_the_offending_layers_and_restores():
    net = _mixed_net()
    x, _ = _mixed_batch()
    with pytest.raises(ValueError, match=r"not scale-invariant: 4\.weight, 4\.bias\. "):
        make_scale_invariant(net, x)
    assert all(p.requires_grad for p in net.parameters())  # classifier unfrozen again

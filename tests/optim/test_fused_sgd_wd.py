"""FusedSGDWD against torch.optim.SGD(foreach=False): bitwise in fp32/fp64, state_dict
interchange, statistics against float64 recomputation, bad input."""

from __future__ import annotations

import copy
import inspect
import math
import os

import pytest
import torch

from scaleinv_kernels import STAT_FIELDS, FusedSGDWD, StatsRecorder
from scaleinv_kernels.optim import mark_members, members_of
from tests.helpers import assert_bitwise, assert_rel

HP = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def _params(dtype=torch.float32, seed=0):
    """A mix of shapes: 0-d, zero-numel, odd sizes, a non-contiguous (transposed) view."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (0,), (1,), (7,), (1023,), (33, 31), (4, 0, 2), (278011,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    base = torch.randn(9, 13, generator=gen).to(dtype)
    params.append(base.t())  # strided leaf-like view
    return [torch.nn.Parameter(p.clone()) for p in params[:-1]] + [
        torch.nn.Parameter(params[-1].clone().t().contiguous().t())]


def _groups(params):
    return [
        {"params": params[:3], "lr": 0.1},
        {"params": params[3:6], "momentum": 0.5, "dampening": 0.2, "weight_decay": 1e-2},
        {"params": params[6:8], "nesterov": True, "momentum": 0.8, "weight_decay": 1e-3},
        {"params": params[8:], "maximize": True, "momentum": 0.0, "weight_decay": 3e-2},
    ]


def _set_grads(params_list, step, gen):
    """Same random grads for every copy; some params skip some steps (grad None)."""
    for i, p0 in enumerate(params_list[0]):
        g = torch.randn(p0.shape, generator=gen).to(p0.dtype)
        skip = (i + step) % 4 == 0
        for params in params_list:
            params[i].grad = None if skip else g.clone()


def _clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def test_fp32_bitwise_equal_to_torch_sgd_many_steps():
    ours_p = _params()
    torch_p = _clone(ours_p)
    ours = FusedSGDWD(_groups(ours_p), **HP)
    ref = torch.optim.SGD(_groups(torch_p), foreach=False, **HP)
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        _set_grads([ours_p, torch_p], step, gen)
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        assert_bitwise(a, b, f"param {i}")
        sa, sb = ours.state[a].get("momentum_buffer"), ref.state[b].get("momentum_buffer")
        assert (sa is None) == (sb is None), f"param {i}: momentum buffer presence differs"
        if sa is not None:
            assert_bitwise(sa, sb, f"buffer {i}")
    assert ours_p[-1].stride() == (1, 13), "non-contiguous param must stay the user's tensor"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_signed_zeros_like_torch_sgd(dtype):
    """Every pairing of ±0.0 and ±1.0 in param and grad, through every group's
    hyper-parameters, for three steps: the sign of each zero as torch.optim.SGD has it."""
    vals = torch.tensor([-0.0, 0.0, 1.0, -1.0], dtype=dtype)
    p0, g0 = vals.repeat_interleave(4), vals.repeat(4)
    ours_p = [torch.nn.Parameter(p0.clone()) for _ in range(9)]
    torch_p = _clone(ours_p)
    ours = FusedSGDWD(_groups(ours_p), **HP)
    ref = torch.optim.SGD(_groups(torch_p), foreach=False, **HP)
    for _ in range(3):
        for a, b in zip(ours_p, torch_p):
            a.grad, b.grad = g0.clone(), g0.clone()
        ours.step()
        ref.step()
    assert any(bool((b == 0).logical_and(b.signbit()).any()) for b in torch_p)
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        assert_bitwise(a, b, f"param {i}")


def test_fp64_bitwise_and_tensor_lr():
    ours_p = _params(torch.float64)
    torch_p = _clone(ours_p)
    ours = FusedSGDWD(ours_p, lr=torch.tensor(0.03, dtype=torch.float64), momentum=0.9,
                      weight_decay=1e-3)
    ref = torch.optim.SGD(torch_p, lr=0.03, momentum=0.9, weight_decay=1e-3, foreach=False)
    gen = torch.Generator().manual_seed(2)
    for step in range(4):
        _set_grads([ours_p, torch_p], step, gen)
        ours.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours_p, torch_p)):
        assert_bitwise(a, b, f"param {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_matches_fp32_upcast(dtype):
    """Math in fp32 and one rounding per stored value, computed here independently."""
    params = _params(dtype)
    ours = FusedSGDWD(params, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    w = [p.detach().float() for p in params]
    bufs = [None] * len(params)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            d = p.grad.float().add(w[i], alpha=1e-2)
            bufs[i] = d.clone() if bufs[i] is None else (
                bufs[i].float().mul(0.9).add(d, alpha=1.0))
            stored_buf = bufs[i].to(dtype)
            d = d.add(bufs[i], alpha=0.9)
            bufs[i] = stored_buf
            w[i] = w[i].add(d, alpha=-0.1).to(dtype).float()
        ours.step()
    for i, p in enumerate(params):
        assert_bitwise(p.detach(), w[i].to(dtype), f"param {i}")
        assert not torch.equal(p.detach().float(), _params(dtype)[i].detach().float()) or \
            p.numel() == 0, "low-precision params must be updated (cf. torch fused SGD bug)"


def test_named_parameters_add_param_group_closure():
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    ours = FusedSGDWD(model[0].named_parameters(), lr=0.1, momentum=0.9)
    ours.add_param_group({"params": list(model[2].named_parameters()), "lr": 0.01})
    ref = torch.optim.SGD(twin[0].named_parameters(), lr=0.1, momentum=0.9, foreach=False)
    ref.add_param_group({"params": list(twin[2].named_parameters()), "lr": 0.01})
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for _ in range(3):
        for net, opt in ((model, ours), (twin, ref)):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert torch.is_tensor(loss)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert_bitwise(a, b, "param")
    assert ours.layer_stats().names[:2] == ["weight", "bias"]


def test_state_dict_interchange_both_directions():
    def train(opt, params, gen, steps):
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()

    base = _params()
    runs = {}
    for first, second in (("ours", "torch"), ("torch", "ours"), ("torch", "torch")):
        params = _clone(base)
        make = lambda kind, ps: (FusedSGDWD(_groups(ps), **HP) if kind == "ours"
                                 else torch.optim.SGD(_groups(ps), foreach=False, **HP))
        gen = torch.Generator().manual_seed(4)
        opt = make(first, params)
        train(opt, params, gen, 3)
        state = copy.deepcopy(opt.state_dict())
        opt2 = make(second, params)
        opt2.load_state_dict(state)
        train(opt2, params, gen, 3)
        runs[(first, second)] = params
    for key in (("ours", "torch"), ("torch", "ours")):
        for i, (a, b) in enumerate(zip(runs[key], runs[("torch", "torch")])):
            assert_bitwise(a, b, f"{key} param {i}")


def _float64_stats(before, grads, after, lr):
    out = {k: [] for k in STAT_FIELDS}
    for w0, g, w1 in zip(before, grads, after):
        w0, g, w1 = w0.double().reshape(-1), g.double().reshape(-1), w1.double().reshape(-1)
        nw, ng, nd = w0.norm(), g.norm(), (w1 - w0).norm()
        out["weight_norm"].append(nw)
        out["grad_norm"].append(ng)
        out["grad_weight_cosine"].append(w0 @ g / (nw * ng))
        out["update_norm"].append(nd)
        out["new_weight_norm"].append(w1.norm())
        cos = (w0 @ w1 / (nw * w1.norm())).clamp(-1, 1)
        sin = (nw**2 * w1.norm() ** 2 - (w0 @ w1) ** 2).clamp_min(0).sqrt() / (nw * w1.norm())
        out["angular_update"].append(torch.atan2(sin, cos))
        out["effective_lr"].append(lr / nw**2)
        out["nonfinite"].append((~torch.isfinite(g)).sum().double())
    return {k: torch.stack(v) for k, v in out.items()}


def test_layer_stats_against_float64():
    gen = torch.Generator().manual_seed(5)
    shapes = [(64, 32, 3, 3), (0,), (1,), (7,), (1023,), (), (278011,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = FusedSGDWD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(3):
        before = [p.detach().clone() for p in params]
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        if step == 2:
            grads[4][3] = float("nan")
            grads[4][9] = float("inf")
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        stats = opt.layer_stats()
        expected = _float64_stats(before, grads, [p.detach() for p in params], 0.1)
        live = [i for i, s in enumerate(shapes) if math.prod(s) > 0 and i != 4 or
                (i == 4 and step < 2)]
        for field in STAT_FIELDS:
            got = getattr(stats, field)
            assert got.dtype == torch.float32 and got.shape == (len(shapes),)
            assert_rel(got[live], expected[field][live].float(), 1e-5, f"step {step} {field}",
                       atol=1e-30)
        assert stats.nonfinite.tolist()[4] == (2.0 if step == 2 else 0.0)
        # the zero-numel segment sits at its own index and does not shift the others
        assert stats.weight_norm[1].item() == 0.0
        assert math.isinf(stats.effective_lr[1].item())


def test_angular_update_accurate_for_tiny_angles():
    """A pure tangential step of relative size 1e-6: acos(cos) would return ~0 or noise."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(4096, generator=gen)
    t = torch.randn(4096, generator=gen)
    t -= (t @ w) / (w @ w) * w  # orthogonal to w
    p = torch.nn.Parameter(w.clone())
    opt = FusedSGDWD([p], lr=1e-6 * float(w.norm() / t.norm()))
    p.grad = -t
    opt.step()
    expected = math.atan2(float((p.detach().double() - w.double()).norm()), float(w.norm()))
    assert_rel(opt.layer_stats().angular_update, torch.tensor([expected]), 1e-3, "tiny angle")


def test_params_without_grad_report_nan_and_track_stats_off():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    opt = FusedSGDWD([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    stats = opt.layer_stats()
    assert not math.isnan(stats.weight_norm[0].item())
    assert all(math.isnan(getattr(stats, f)[1].item()) for f in STAT_FIELDS)
    quiet = FusedSGDWD([b], lr=0.1, track_stats=False)
    b.grad = torch.ones(4)
    quiet.step()
    assert quiet._stats == {}  # no statistics buffer was ever allocated or written
    with pytest.raises(RuntimeError, match="track_stats=True"):
        quiet.layer_stats()


def test_stats_recorder_history_and_exports(tmp_path):
    params = [torch.nn.Parameter(torch.randn(10, 10)), torch.nn.Parameter(torch.randn(5))]
    opt = FusedSGDWD(params, lr=0.1, weight_decay=0.1)
    rec = StatsRecorder(opt, every=2)
    norms = []
    for _ in range(7):
        for p in params:
            p.grad = torch.randn(p.shape)
        norms.append([float(p.detach().norm()) for p in params])
        opt.step()
    arrays = rec.to_numpy()
    assert arrays["step"].tolist() == [2, 4, 6]
    assert arrays["weight_norm"].shape == (3, 2)
    assert abs(arrays["weight_norm"][1, 0] - norms[3][0]) < 1e-4 * norms[3][0]
    frame = rec.to_dataframe()
    assert len(frame) == 6 and set(STAT_FIELDS) <= set(frame.columns)
    rec.plot(tmp_path / "stats.png", fields=("effective_lr", "angular_update"),
             reference={"angular_update": 0.1})
    assert (tmp_path / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="every"):
        StatsRecorder(opt, every=0)


@pytest.mark.parametrize(
    "make, error, text",
    [
        (lambda p: FusedSGDWD(p, lr=-0.1), ValueError, "lr"),
        (lambda p: FusedSGDWD(p, momentum=-0.5), ValueError, "momentum"),
        (lambda p: FusedSGDWD(p, weight_decay=-1e-4), ValueError, "weight_decay"),
        (lambda p: FusedSGDWD(p, dampening=-1.0), ValueError, "dampening"),
        (lambda p: FusedSGDWD(p, nesterov=True), ValueError, "nesterov"),
        (lambda p: FusedSGDWD(p, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
         "nesterov"),
        (lambda p: FusedSGDWD([p[0], p[0]]), ValueError, "twice"),
        (lambda p: FusedSGDWD([torch.zeros(3, dtype=torch.complex64)]), TypeError, "complex"),
        (lambda p: FusedSGDWD([torch.zeros(3, dtype=torch.int64)]), TypeError, "int64"),
        (lambda p: FusedSGDWD([{"lr": 0.1}]), ValueError, "'params'"),
    ],
)
def test_bad_construction(make, error, text):
    with pytest.raises(error, match=text):
        make([torch.nn.Parameter(torch.ones(3))])


def test_signature_is_torch_sgd_s():
    """Every torch.optim.SGD keyword, at the same position and of the same kind, with the
    same default; track_stats comes after them."""
    ours = list(inspect.signature(FusedSGDWD.__init__).parameters.values())
    theirs = list(inspect.signature(torch.optim.SGD.__init__).parameters.values())
    assert [(q.name, q.kind) for q in ours[:len(theirs)]] == [(q.name, q.kind) for q in theirs]
    assert [q.default for q in ours[:len(theirs)]] == [q.default for q in theirs]
    assert [q.name for q in ours[len(theirs):]] == ["track_stats"]


@pytest.mark.parametrize("kwargs", [dict(foreach=True), dict(foreach=False),
                                    dict(fused=True), dict(fused=False),
                                    dict(foreach=None, fused=None, differentiable=False)])
def test_torch_implementation_switches_are_accepted_and_recorded(kwargs):
    """foreach/fused choose among torch's implementations: accepted, recorded in the
    defaults as torch does, and without effect on the (one, fused) update."""
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    twin = _clone(params)
    ours = FusedSGDWD(params, 0.1, 0.9, weight_decay=1e-3, **kwargs)
    ref = torch.optim.SGD(twin, 0.1, 0.9, weight_decay=1e-3, foreach=False)
    for key, default in (("foreach", None), ("fused", None), ("differentiable", False)):
        assert ours.defaults[key] == kwargs.get(key, default)
    for _ in range(2):
        for p, t in zip(params, twin):
            p.grad = torch.randn(5)
            t.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, t in zip(params, twin):
        assert_bitwise(p, t, f"{kwargs}")


def test_differentiable_is_refused_with_a_reason():
    with pytest.raises(ValueError, match=r"differentiable=True.*in place.*torch\.optim\.SGD"):
        FusedSGDWD([torch.nn.Parameter(torch.ones(2))], lr=0.1, differentiable=True)


@pytest.mark.parametrize("groups", [1, 2])
def test_sparse_grad_is_refused_before_anything_is_written(groups):
    """One launch (the grads reach the op directly) and several launches (checked up
    front): either way a ValueError naming the parameter, and nothing changes."""
    model = torch.nn.ParameterDict({"dense": torch.nn.Parameter(torch.ones(5)),
                                    "emb": torch.nn.Parameter(torch.ones(4, 3))})
    if groups == 1:
        spec = [("dense", model["dense"]), ("emb", model["emb"])]
    else:
        spec = [{"params": [("dense", model["dense"])]},
                {"params": [("emb", model["emb"])], "lr": 0.2}]
    opt = FusedSGDWD(spec, lr=0.1, momentum=0.9)
    model["dense"].grad = torch.ones(5)
    model["emb"].grad = torch.ones(4, 3)
    opt.step()  # momentum buffers exist now
    snapshot = [p.detach().clone() for p in model.values()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.values()]
    model["dense"].grad = torch.ones(5)
    model["emb"].grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(ValueError, match="parameter 'emb'.*sparse gradient"):
        opt.step()
    for p, before, buf in zip(model.values(), snapshot, buffers):
        assert_bitwise(p.detach(), before, "param after the refused step")
        assert_bitwise(opt.state[p]["momentum_buffer"], buf, "buffer after the refused step")


def test_layer_stats_makes_no_tensor_from_a_list_after_the_first_call(monkeypatch):
    """The row indices of the statistics are built once per plan: later layer_stats()
    calls create no tensor from a Python list (on CUDA each would be a copy that waits
    for the device; the CUDA test of the same is in test_fused_sgd_wd_cuda_path.py)."""
    stacked, plain = _ensemble_params(8)
    opt = FusedSGDWD([{"params": stacked, "lr": torch.full((M,), 0.1)},
                      {"params": [plain], "lr": torch.tensor(0.2)}], momentum=0.9)
    for p in stacked + [plain]:
        p.grad = torch.randn(p.shape)
    opt.step()
    first = opt.layer_stats()
    calls = []
    real = torch.tensor

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    opt.step()
    monkeypatch.setattr(torch, "tensor", counting)
    second = opt.layer_stats()
    monkeypatch.undo()
    assert calls == []
    assert torch.equal(second.member, first.member)
    assert torch.equal(second.param_index, first.param_index)
    assert not torch.equal(second.weight_norm, first.weight_norm)  # this step's values


def _grad_of_other_shape(p):
    p.grad = torch.ones(3)
    p.data = torch.ones(4)  # torch refuses a mismatched .grad, but not a resized param


def _grad_of_other_dtype(p):
    p.grad_dtype = None  # allow any grad dtype, as mixed-precision code may
    p.grad = torch.ones(3, dtype=torch.float64)


def _sparse_grad(p):
    p.grad = torch.ones(3).to_sparse()


@pytest.mark.parametrize(
    "make_bad, error, text",
    [(_grad_of_other_shape, ValueError, "shape"), (_grad_of_other_dtype, ValueError, "grad"),
     (_sparse_grad, ValueError, "sparse")],
)
def test_bad_grad_names_param_and_mutates_nothing(make_bad, error, text):
    model = torch.nn.ParameterDict({"good": torch.nn.Parameter(torch.ones(5)),
                                    "bad": torch.nn.Parameter(torch.ones(3))})
    opt = FusedSGDWD([{"params": [model["good"]]}, {"params": [model["bad"]], "lr": 0.2}],
                     lr=0.1, momentum=0.9)
    model["good"].grad = torch.ones(5)
    opt.step()  # "bad" has no grad yet: no momentum buffer either
    model["good"].grad = torch.ones(5)
    make_bad(model["bad"])
    snapshot = [p.detach().clone() for p in model.values()]
    buffer = opt.state[model["good"]]["momentum_buffer"].clone()
    with pytest.raises(error, match=text) as info:
        opt.step()
    assert "param group 1" in str(info.value)
    for p, before in zip(model.values(), snapshot):
        assert_bitwise(p.detach(), before, "param after failed step")
    assert_bitwise(opt.state[model["good"]]["momentum_buffer"], buffer, "buffer after failure")
    assert "momentum_buffer" not in opt.state[model["bad"]]


def test_nonfinite_grads_follow_torch():
    ours_p = [torch.nn.Parameter(torch.randn(50))]
    torch_p = _clone(ours_p)
    ours = FusedSGDWD(ours_p, **HP)
    ref = torch.optim.SGD(torch_p, foreach=False, **HP)
    g = torch.randn(50)
    g[[1, 2]] = torch.tensor([float("nan"), float("inf")])
    ours_p[0].grad, torch_p[0].grad = g.clone(), g.clone()
    ours.step()
    ref.step()
    assert_bitwise(ours_p[0], torch_p[0], "param")
    assert ours.layer_stats().nonfinite.item() == 2.0


def test_extension_is_in_use_when_required():
    """`make test` and CI set SCALEINV_REQUIRE_EXT=1: a broken build must fail the suite
    there. A plain pytest run without it may use the reference fallback on purpose (e.g.
    a pure-Python install), so there this check does not apply."""
    if os.environ.get("SCALEINV_REQUIRE_EXT") != "1":
        pytest.skip("needs SCALEINV_REQUIRE_EXT=1 (make test and CI set it)")
    from scaleinv_kernels._extension import extension_loaded

    assert extension_loaded()
    assert FusedSGDWD([torch.nn.Parameter(torch.ones(2))]).backend == "cpp"


# ---- ensembles: per-member lr / weight decay and per-member statistics ---------------
M = 4
MEMBER_SHAPES = [(5, 3), (7,), (), (0, 2)]  # per member; the ensemble tensor is [M, *shape]


def _ensemble_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    stacked = [mark_members(torch.nn.Parameter(torch.randn((M, *s), generator=gen)), M)
               for s in MEMBER_SHAPES]
    plain = torch.nn.Parameter(torch.randn(6, generator=gen))  # an ordinary tensor
    return stacked, plain


@pytest.mark.parametrize("nesterov", [False, True])
def test_per_member_hparams_bitwise_equal_separate_runs(nesterov):
    """Stacked [M, ...] params with lr/wd tensors of length M == M separate FusedSGDWD and
    torch.optim.SGD(foreach=False) runs on the members' slices with scalar lr[m], wd[m],
    through an lr schedule (new tensor, then in-place change); wd[1] == 0."""
    stacked, plain = _ensemble_params()
    lr = torch.tensor([0.1, 0.05, 0.2, 0.013])
    wd = torch.tensor([1e-2, 0.0, 5e-4, 3e-3])
    mom = dict(momentum=0.9, nesterov=nesterov)
    ours = FusedSGDWD([{"params": stacked, "lr": lr.clone(), "weight_decay": wd},
                       {"params": [plain], "lr": 0.3, "weight_decay": 1e-3}], **mom)
    members = [[torch.nn.Parameter(p.detach()[m].clone()) for p in stacked] for m in range(M)]
    twins = [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in members]
    fused = [FusedSGDWD(ps, lr=float(lr[m]), weight_decay=float(wd[m]), **mom)
             for m, ps in enumerate(members)]
    torch_opts = [torch.optim.SGD(ps, lr=float(lr[m]), weight_decay=float(wd[m]),
                                  foreach=False, **mom) for m, ps in enumerate(twins)]
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        if step == 2:  # a schedule: assign a new tensor ...
            lr = lr * torch.tensor([0.5, 1.0, 0.25, 2.0])
            ours.param_groups[0]["lr"] = lr.clone()
        if step == 4:  # ... or change it in place
            lr[3] = 0.07
            ours.param_groups[0]["lr"][3] = 0.07
        for j, p in enumerate(stacked):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.clone()
            for m in range(M):
                members[m][j].grad = g[m].clone()
                twins[m][j].grad = g[m].clone()
        plain.grad = torch.randn(6, generator=gen)
        for m in range(M):
            for opt in (fused[m], torch_opts[m]):
                opt.param_groups[0]["lr"] = float(lr[m])
        ours.step()
        for opt in fused + torch_opts:
            opt.step()
    for j, p in enumerate(stacked):
        for m in range(M):
            what = f"tensor {j} member {m}"
            assert_bitwise(p.detach()[m], twins[m][j].detach(), f"{what} vs torch SGD")
            assert_bitwise(p.detach()[m], members[m][j].detach(), f"{what} vs FusedSGDWD")
            assert_bitwise(ours.state[p]["momentum_buffer"][m],
                           torch_opts[m].state[twins[m][j]]["momentum_buffer"],
                           f"{what} momentum buffer")
    # statistics per (member, tensor) equal the separate runs' statistics, effective_lr
    # included (each segment's own lr)
    stats = ours.layer_stats()
    n = len(MEMBER_SHAPES)
    assert stats.member.tolist() == [m for _ in range(n) for m in range(M)] + [-1]
    assert stats.param_index.tolist() == [j for j in range(n) for _ in range(M)] + [n]
    assert stats.names == [f"group0.param{j}" for j in range(n) for _ in range(M)] + [
        "group1.param0"]
    for field in STAT_FIELDS:
        table = stats.per_member(field)
        assert table.shape == (M, n)
        for m in range(M):
            assert_bitwise(table[m], getattr(fused[m].layer_stats(), field), f"{field} {m}")
    assert_rel(stats.per_member("effective_lr")[:, 0],
               lr / stats.per_member("weight_norm")[:, 0].double() ** 2, 1e-6, "effective lr")


def test_ensemble_tensor_with_scalar_hparams_is_cut_into_members():
    """Scalar lr on marked params: the update is unchanged (bitwise torch SGD) and the
    statistics come per member."""
    stacked, _ = _ensemble_params(2)
    twin = _clone(stacked)
    ours = FusedSGDWD(stacked, lr=torch.tensor(0.05), momentum=0.9, weight_decay=1e-3)
    ref = torch.optim.SGD(twin, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, t in zip(stacked, twin):
            p.grad = torch.randn(p.shape, generator=gen)
            t.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, t in zip(stacked, twin):
        assert_bitwise(p, t, "ensemble tensor, scalar lr")
    stats = ours.layer_stats()
    assert stats.weight_norm.shape == (M * len(MEMBER_SHAPES),)
    expected = torch.stack([p.detach().reshape(M, -1).double().norm(dim=1) for p in twin], 1)
    before = stats.per_member("weight_norm")  # norms before the last step
    assert before.shape == (M, len(MEMBER_SHAPES)) and bool((before[:, 3] == 0).all())
    new = stats.per_member("new_weight_norm")
    assert_rel(new[:, :3], expected[:, :3].float(), 1e-6, "per-member new weight norm")
    assert set(stats.as_dict()) == set(STAT_FIELDS)


def test_per_member_state_dict_round_trip():
    def run(split):
        stacked, plain = _ensemble_params(4)
        make = lambda: FusedSGDWD(
            [{"params": stacked, "lr": torch.tensor([0.1, 0.2, 0.05, 0.0]),
              "weight_decay": torch.tensor([0.0, 1e-2, 1e-3, 5e-2], dtype=torch.float64)},
             {"params": [plain]}], lr=0.1, momentum=0.9)
        opt = make()
        gen = torch.Generator().manual_seed(5)
        for step in range(4):
            for p in stacked + [plain]:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            if step == split:
                state = copy.deepcopy(opt.state_dict())
                assert torch.is_tensor(state["param_groups"][0]["lr"])
                opt = make()
                opt.load_state_dict(state)
        return stacked + [plain]

    for a, b in zip(run(split=1), run(split=-1)):
        assert_bitwise(a, b, "after state_dict round trip")


def _marked(shape, m):
    return mark_members(torch.nn.Parameter(torch.ones(shape)), m)


@pytest.mark.parametrize(
    "group, text",
    [
        ({"params": [("ens.w", _marked((4, 3), 4)), ("fc.weight", torch.nn.Parameter(
            torch.ones(3)))], "lr": torch.full((4,), 0.1)},
         r"param group 0 has a per-member lr of length 4 but parameter 'fc.weight' is not an "
         r"ensemble tensor \(no member dimension\); put .* separate group"),
        ({"params": [("a", _marked((4, 3), 4)), ("b", _marked((2, 3), 2))],
          "weight_decay": torch.full((4,), 0.1)},
         "per-member weight_decay of length 4 but parameter 'b' is an ensemble tensor of 2"),
        ({"params": [_marked((4, 3), 4)], "lr": torch.full((4,), 0.1),
          "weight_decay": torch.full((3,), 0.1)}, "same length"),
        ({"params": [_marked((4, 3), 4)], "lr": torch.tensor([0.1, -0.1, 0.1, 0.1])},
         r"invalid per-member lr -0.1.* \(member 1\); .*finite and >= 0"),
        ({"params": [_marked((4, 3), 4)], "weight_decay": torch.tensor([0.1, 0, float("nan"),
                                                                      0])}, "finite"),
        ({"params": [_marked((4, 3), 4)], "lr": torch.full((2, 2), 0.1)}, "0-d .* or 1-D"),
        ({"params": [_marked((4, 3), 4)], "lr": torch.ones(4, dtype=torch.int64)},
         "float tensor"),
        ({"params": [_marked((4, 3), 4)], "weight_decay": torch.tensor(0.1)}, "weight_decay"),
    ],
)
def test_bad_per_member_groups(group, text):
    with pytest.raises(ValueError, match=text):
        FusedSGDWD([group], lr=0.1)


def test_bad_per_member_hparams_at_step_change_nothing():
    """Hyper-parameters changed after construction are checked in step(), before any
    launch writes (the ordinary group is not updated either)."""
    stacked, plain = _ensemble_params(6)
    lr = torch.full((M,), 0.1)
    opt = FusedSGDWD([{"params": [("plain", plain)], "lr": 0.2},
                      {"params": [("ens", stacked[0])], "lr": lr}], momentum=0.9)
    for p in (plain, stacked[0]):
        p.grad = torch.ones(p.shape)
    snapshot = [plain.detach().clone(), stacked[0].detach().clone()]
    for change, text in [(lambda g: g.update(lr=torch.full((M + 1,), 0.1)),
                          "length 5 but parameter 'ens' is an ensemble tensor of 4"),
                         (lambda g: g["lr"].__setitem__(2, -1.0), "member 2"),
                         (lambda g: g["lr"].__setitem__(2, float("inf")), "finite")]:
        opt.param_groups[1]["lr"] = lr.clone()
        change(opt.param_groups[1])
        with pytest.raises(ValueError, match=text):
            opt.step()
        assert_bitwise(plain.detach(), snapshot[0], "ordinary param after failed step")
        assert_bitwise(stacked[0].detach(), snapshot[1], "ensemble param after failed step")
        assert opt.state[plain] == {}


def test_mark_members_and_layer_stats_errors():
    t = torch.nn.Parameter(torch.ones(3, 2))
    assert members_of(t) is None and mark_members(t, 3) is t and members_of(t) == 3
    for bad, m in [(torch.tensor(1.0), 1), (torch.ones(3, 2), 2), (torch.ones(3), 0),
                   (torch.ones(0, 2), 0)]:
        with pytest.raises(ValueError):
            mark_members(bad, m)
    plain = torch.nn.Parameter(torch.ones(3))
    opt = FusedSGDWD([plain], lr=0.1)
    plain.grad = torch.ones(3)
    opt.step()
    stats = opt.layer_stats()
    assert stats.member.tolist() == [-1] and stats.param_index.tolist() == [0]
    with pytest.raises(ValueError, match="no ensemble tensors"):
        stats.per_member("weight_norm")
    mixed = FusedSGDWD([_marked((4, 2), 4), _marked((2, 2), 2)], lr=0.1)
    for p in mixed.param_groups[0]["params"]:
        p.grad = torch.ones(p.shape)
    mixed.step()
    with pytest.raises(ValueError, match="different member counts"):
        mixed.layer_stats().per_member("grad_norm")
    with pytest.raises(ValueError, match="unknown field"):
        mixed.layer_stats().per_member("names")


def test_stats_recorder_member_rows():
    stacked, plain = _ensemble_params(7)
    opt = FusedSGDWD([("ens.w", stacked[0]), ("fc.w", plain)], lr=0.1, weight_decay=0.1)
    rec = StatsRecorder(opt)
    for _ in range(2):
        for p in (stacked[0], plain):
            p.grad = torch.randn(p.shape)
        opt.step()
    frame = rec.to_dataframe()
    assert len(frame) == 2 * (M + 1)
    last = frame[frame.step == 2]
    assert last.member.tolist() == [0, 1, 2, 3, -1]
    assert last.layer.tolist() == ["ens.w"] * M + ["fc.w"]
    per_member = opt.layer_stats().per_member("weight_norm")[:, 0]
    assert_rel(torch.tensor(last.weight_norm.to_numpy()[:M]), per_member, 0, "recorded")

"""fig1-fullbatch: the smoke preset shows the claim; a run killed with SIGKILL and resumed
gives the same result.json, bit for bit, as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from scaleinv_kernels.experiments import cli
from scaleinv_kernels.experiments.fig1_fullbatch import PRESETS, verdicts
from scaleinv_kernels.models import normalized_resnet, scale_classifier

NAME = "fig1-fullbatch"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("fig1fb")
    assert cli.main([NAME, "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    assert (out / NAME / "figure.png").stat().st_size > 10_000
    assert not (out / NAME / "checkpoint.pt").exists()
    return json.loads((out / NAME / "result.json").read_text())


def test_smoke_result_and_claim(smoke):
    c = PRESETS["smoke"]
    n = c["epochs"]
    assert smoke["epochs"] == list(range(n)) and smoke["wd_off_epoch"] == c["wd_off_epoch"]
    for key in ("train_acc", "train_loss", "weight_norm"):
        assert len(smoke[key]) == n
    assert set(smoke["effective_lr"]) == {"conv1.weight", "conv2.weight", "conv3.weight"}
    # effective LR η/‖w_l‖² and the total norm describe the same weights
    inv = sum(c["lr"] / v[0] for v in smoke["effective_lr"].values())
    assert inv == pytest.approx(smoke["weight_norm"][0] ** 2, rel=1e-5)
    # the claim: 100 % reached with WD, then lost; after WD is off it converges
    assert smoke["reached_100"] and smoke["lost_after_100"]
    assert smoke["converged_after_wd_off"]
    assert smoke["first_100_epoch"] < smoke["first_lost_epoch"] < c["wd_off_epoch"]
    # the loss of the instability: a spike of at least 10x after 100 % was reached
    lost = smoke["first_lost_epoch"]
    assert max(smoke["train_loss"][lost:c["wd_off_epoch"]]) > 10 * smoke["train_loss"][lost - 1]
    # without WD the norm no longer shrinks
    tail = smoke["weight_norm"][-c["converge_window"]:]
    assert all(b >= a * (1 - 1e-6) for a, b in zip(tail, tail[1:]))


def test_verdicts():
    acc = [0.5, 1.0, 1.0, 0.9, 1.0, 0.8, 1.0, 1.0]
    assert verdicts(acc, 5, 2) == {"reached_100": True, "first_100_epoch": 1,
                                   "lost_after_100": True, "first_lost_epoch": 3,
                                   "converged_after_wd_off": True}
    assert verdicts(acc, 5, 3)["converged_after_wd_off"] is False  # window starts at 5
    assert verdicts([0.5] * 8, 5, 2)["reached_100"] is False


def test_normalized_resnet_is_scale_invariant():
    torch.manual_seed(0)
    model = normalized_resnet((4, 8), blocks_per_stage=1).train()
    scale_classifier(model, 3.0)
    x = torch.randn(6, 3, 8, 8)
    ref = model(x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.ndim == 4 for p in trainable)  # only conv weights train
    with torch.no_grad():
        for i, p in enumerate(trainable):
            p.mul_(2.0 + i)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        scale_classifier(model, 0.0)


def test_resume_after_sigkill_is_exact(tmp_path, smoke):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "scaleinv_kernels.experiments", NAME, "--preset", "smoke",
           "--out", str(tmp_path), "--no-progress"]
    ckpt, result = tmp_path / NAME / "checkpoint.pt", tmp_path / NAME / "result.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ckpt.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    time.sleep(0.2)  # let it run on a little, past the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not result.exists()
    saved = torch.load(ckpt, weights_only=False)["state"]["epoch"]
    assert 1 <= saved < PRESETS["smoke"]["epochs"]

    assert cli.main([*cmd[3:], "--resume"]) == 0  # same thread count (one_thread)
    resumed = json.loads(result.read_text())
    assert not ckpt.exists()
    for r in (resumed, smoke):
        r.pop("runtime_s")
    assert resumed == smoke  # every curve and float exactly equal


def test_cifar10_uses_the_normalized_resnet(tmp_path, one_thread):
    import pickle

    import numpy as np

    from scaleinv_kernels.experiments import fig1_fullbatch
    from scaleinv_kernels.experiments.common import RunContext

    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, 4)]}, f)
    config = {**PRESETS["smoke"], "n_train": 16, "downsample": 1, "epochs": 3,
              "wd_off_epoch": 2, "converge_window": 1}
    ctx = RunContext(name=NAME, preset="smoke", config=config, out=tmp_path / "out",
                     device=torch.device("cpu"), seed=0, data="cifar10", data_root=tmp_path,
                     progress=False)
    r = fig1_fullbatch.run(ctx)
    assert len(r["train_acc"]) == 3
    # stem + 3 stages of one block (two convs each) + the two downsampling shortcuts
    assert len(r["effective_lr"]) == 1 + 3 * 2 + 2
    with pytest.raises(ValueError, match="training images"):
        fig1_fullbatch.run(RunContext(**{**ctx.__dict__, "config": {**config, "n_train": 99}}))

"""fig4-equilibrium under torchrun (gloo, 2 and 3 CPU processes) equals one process, bit
for bit, including the checkpoints and resumes at other world sizes (2 → 1, 1 → 3).

The runs go through a small launcher (written to tmp_path) that wraps the CLI and keeps a
copy of every checkpoint as ``checkpoint.<epoch>.pt`` (the CLI deletes the live one when a
run finishes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from scaleinv_kernels.experiments import cli, common
from scaleinv_kernels.experiments import fig4_equilibrium as fig4

EXP = "fig4-equilibrium"
ARGS = [EXP, "--preset", "smoke", "--no-progress", "--threads", "1"]
REPO = Path(__file__).resolve().parents[2]

LAUNCHER = """
import shutil, sys
from scaleinv_kernels.experiments import cli, common
_save = common.atomic_save
def save(obj, path):
    _save(obj, path)
    epoch = obj["state"]["trainer"]["epoch"]
    shutil.copy(path, path.with_name(f"checkpoint.{epoch}.pt"))
common.atomic_save = save
sys.exit(cli.main(sys.argv[1:]))
"""


def _keep_checkpoints(monkeypatch):
    save = common.atomic_save

    def keeping(obj, path):
        save(obj, path)
        shutil.copy(path, path.with_name(f"checkpoint.{obj['state']['trainer']['epoch']}.pt"))

    monkeypatch.setattr(common, "atomic_save", keeping)


def _torchrun(tmp_path: Path, nproc: int, out: Path, *extra: str) -> None:
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    # PYTHONFAULTHANDLER: a rank that aborts prints its Python stack into the failure
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCALEINV_DIST_TIMEOUT": "60",
           "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}",
                           str(launcher), *ARGS, "--out", str(out), *extra],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"


def _result(out: Path) -> dict:
    r = json.loads((out / EXP / "result.json").read_text())
    assert r.pop("runtime_s") > 0
    return r


def _assert_same_tree(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_fig4_torchrun_equals_one_process_and_resumes_at_any_world_size(tmp_path,
                                                                         monkeypatch):
    # one process, in this interpreter (the reference)
    _keep_checkpoints(monkeypatch)
    torch.set_num_threads(1)
    single = tmp_path / "single"
    assert cli.main([*ARGS, "--out", str(single)]) == 0
    want = _result(single)

    # the smoke preset's checkpoint epochs (the last epoch finishes the run instead)
    smoke = fig4.PRESETS["smoke"]
    saved = list(range(smoke["checkpoint_every"], smoke["epochs"], smoke["checkpoint_every"]))
    assert saved and want["eval_epochs"] == list(
        range(smoke["eval_every"], smoke["epochs"] + 1, smoke["eval_every"]))

    # two processes: same result.json, same (full, every member) checkpoints
    two = tmp_path / "two"
    _torchrun(tmp_path, 2, two)
    assert _result(two) == want
    assert not (two / EXP / "checkpoint.pt").exists()  # finished runs leave none
    for epoch in saved:
        a, b = (_load(d / EXP / f"checkpoint.{epoch}.pt") for d in (two, single))
        # the global torch RNG (unused by fig4, saved for resumes) starts from torch's
        # default in a fresh process but from pytest's leftover state here
        del a["state"]["rng"], b["state"]["rng"]
        _assert_same_tree(a, b)

    # resume 2 → 1: one process continues the 2-process checkpoint of the first epoch saved
    one = tmp_path / "one"
    (one / EXP).mkdir(parents=True)
    shutil.copy(two / EXP / f"checkpoint.{saved[0]}.pt", one / EXP / "checkpoint.pt")
    assert cli.main([*ARGS, "--out", str(one), "--resume"]) == 0
    assert _result(one) == want

    # resume 1 → 3: three processes (contiguous blocks of the members) continue the
    # one-process checkpoint of the last epoch saved
    three = tmp_path / "three"
    (three / EXP).mkdir(parents=True)
    shutil.copy(single / EXP / f"checkpoint.{saved[-1]}.pt", three / EXP / "checkpoint.pt")
    _torchrun(tmp_path, 3, three, "--resume")
    assert _result(three) == want


def test_experiment_without_member_sharding_refuses_torchrun(tmp_path, monkeypatch, capsys):
    # pretend torchrun started 2 ranks (no process group is needed to be refused)
    from scaleinv_kernels.ensemble import distributed as D

    monkeypatch.setattr(cli, "init_distributed",
                        lambda device: D.DistInfo(rank=0, world_size=2, is_main=True))
    monkeypatch.setattr(cli, "close_distributed", lambda info, **kw: None)
    assert cli.main(["fig1-toy", "--preset", "smoke", "--out", str(tmp_path),
                     "--no-progress"]) == 2
    assert "does not support several processes" in capsys.readouterr().err
    assert not (tmp_path / "fig1-toy").exists()

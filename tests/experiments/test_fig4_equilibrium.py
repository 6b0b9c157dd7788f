"""fig4-equilibrium smoke run: structure and the separation at the equalization epoch."""

from __future__ import annotations

from tests.helpers import run_experiment


def test_fig4_smoke(tmp_path):
    r = run_experiment(tmp_path, "fig4-equilibrium", "--preset", "smoke")
    c = r["config"]
    n_eval = len(r["eval_epochs"])
    assert r["eval_epochs"][-1] == c["epochs"] and c["equalize_epoch"] in r["eval_epochs"]
    assert set(r["l1"]) == {"const|hot", "const|cold", "hot|cold"}
    assert all(len(v) == n_eval for v in r["l1"].values())
    assert len(r["noise_floor"]) == n_eval and all(0 < f < 2 for f in r["noise_floor"])
    assert all(len(v) == n_eval for v in r["test_accuracy"].values())
    # λe equal after the equalization epoch for every schedule
    after = {s["intrinsic_lr_after"] for s in r["schedules"].values()}
    assert max(after) - min(after) < 1e-12
    # the schedules' histories differ: at equalization they are far apart in function space
    assert r["separated_at_equalize"] is True
    # ... and the distance shrinks afterwards
    for values in r["l1"].values():
        assert values[-1] < values[r["eval_epochs"].index(c["equalize_epoch"])]
    # nets learned something (10 classes: chance is 0.1)
    assert all(v[-1] > 0.6 for v in r["test_accuracy"].values())
    for layers in r["effective_lr"].values():
        assert set(layers) == {"net.fc1.weight", "net.fc2.weight"}
        assert all(len(v) == c["epochs"] for v in layers.values())

"""The demo runs end to end (20 steps) and writes a PNG and a complete result.json."""

import json
import math

from scaleinv_kernels.experiments import demo


def test_demo_smoke(tmp_path, capsys):
    result = demo.main(["--max-steps", "20", "--every", "2", "--no-progress",
                        "--out", str(tmp_path)])

    png = tmp_path / "stats.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000

    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("hyperparameters", "steps", "predicted_angular_update", "final_angular_update",
                "final_angular_update_ratio", "test_accuracy", "runtime_seconds"):
        assert key in saved, key
    assert saved["steps"] == 20
    hp = saved["hyperparameters"]
    assert hp["max_steps"] == 20 and hp["every"] == 2
    predicted = math.sqrt(2 * hp["lr"] * hp["weight_decay"] / (1 + hp["momentum"]))
    assert math.isclose(saved["predicted_angular_update"], predicted, rel_tol=1e-12)
    layers = ["conv1.weight", "conv2.weight", "conv3.weight"]
    assert list(saved["final_angular_update"]) == layers
    for name in layers:
        au = saved["final_angular_update"][name]
        assert math.isfinite(au) and 0 < au < 1
        assert math.isclose(saved["final_angular_update_ratio"][name], au / predicted,
                            rel_tol=1e-5)
    assert list(saved["final_effective_lr"]) == layers
    assert all(math.isfinite(v) and v > 0 for v in saved["final_effective_lr"].values())
    assert 0 < saved["final_window_steps"] <= saved["steps"]
    assert math.isfinite(saved["final_train_loss"]) and saved["final_train_loss"] > 0
    for key in ("train_accuracy", "test_accuracy", "test_accuracy_ema_batchnorm"):
        assert 0.0 <= saved[key] <= 1.0, key
    # 20 steps learn something: the last batch's loss is below that of a uniform guess over
    # the 10 classes (ln 10 ≈ 2.30) and the test accuracy above chance (0.1 on 1000 points;
    # its sampling error at p ≈ 0.1 is ≈ 0.01, so random labels would not pass)
    assert saved["final_train_loss"] < math.log(10)
    assert saved["test_accuracy"] > 0.1
    # the run took time and the training part of it is inside the whole
    assert 0 < saved["train_seconds"] <= saved["runtime_seconds"]

    summary = capsys.readouterr().out
    assert str(png) in summary and "predicted" in summary.lower()


def test_predicted_angular_update():
    assert math.isclose(demo.predicted_angular_update(0.1, 1e-2, 0.9),
                        math.sqrt(2e-3 / 1.9))
    assert math.isclose(demo.predicted_angular_update(0.5, 2e-4, 0.0), math.sqrt(2e-4))

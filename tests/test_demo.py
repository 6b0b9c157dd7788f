"""The demo runs end to end (20 steps) and writes a PNG and a complete result.json."""

import json
import math
import time

from scaleinv_kernels.experiments import demo


def test_demo_smoke(tmp_path, capsys):
    start = time.perf_counter()
    result = demo.main(["--max-steps", "20", "--every", "2", "--no-progress",
                        "--out", str(tmp_path)])
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"the smoke run took {elapsed:.1f} s"

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
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert math.isfinite(saved["runtime_seconds"]) and saved["runtime_seconds"] > 0

    summary = capsys.readouterr().out
    assert str(png) in summary and "predicted" in summary.lower()


def test_predicted_angular_update():
    assert math.isclose(demo.predicted_angular_update(0.1, 1e-2, 0.9),
                        math.sqrt(2e-3 / 1.9))
    assert math.isclose(demo.predicted_angular_update(0.5, 2e-4, 0.0), math.sqrt(2e-4))

"""The benchmarks' own logic, in process: the serving grid and its model configs, the rule that picks a
setting and reports the targets, the engines read from a model log, and inference.py without OpenVINO.
(The scripts as a user runs them: tests/test_bench.py.)"""
import json

import pytest

from bench import inference, serving as bench_serving


def test_inference_without_openvino_says_so(tmp_path, monkeypatch, capsys):
    """Without the bench-only dependency the benchmark runs and its rows say "not installed"."""
    real = inference.engine_version
    monkeypatch.setattr(inference, "engine_version", lambda e: None if e == "openvino" else real(e))
    out = str(tmp_path / "inference.json")
    rows = inference.main(["--smoke", "--models", "base_cnn", "--engines", "openvino", "--out", out])
    assert [(r["engine"], r["available"]) for r in rows] == [("torch", True), ("openvino", False)]
    openvino_rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| base_cnn | OpenVINO")]
    assert len(openvino_rows) == 3 and all("not installed" in line for line in openvino_rows)  # one per table
    with open(out) as f:
        assert json.load(f)["results"][1]["reason"] == "not installed"


def test_grid_covers_workers_threads_batch_and_delay():
    names = [g.name for g in bench_serving.GRID]
    assert len(set(names)) == len(names)
    assert {(g.workers, g.threads) for g in bench_serving.GRID if g.spin} == {(1, 2), (2, 1)}
    assert {(g.workers, g.threads) for g in bench_serving.GRID if not g.spin} == {(1, 2), (2, 2)}
    assert all(g.name.endswith("-nospin") != g.spin for g in bench_serving.GRID)
    assert {g.batch_size for g in bench_serving.GRID} == {1, 4, 8}
    assert {g.delay_ms for g in bench_serving.GRID if g.batch_size > 1} == {1, 5}
    assert all(g.delay_ms == 0 for g in bench_serving.GRID if g.batch_size == 1)


def test_grid_config_sets_the_model_config_keys():
    shipped = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 1, "responseTimeout": 30,
               "handler": {"threads": 2}}
    setting = bench_serving.GridSetting("w2-t1-b4-d5", 2, 1, 4, 5, True)
    config = bench_serving.grid_config(shipped, setting)
    assert config == {"minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 5, "responseTimeout": 30,
                      "handler": {"threads": 1}}
    sleeping = bench_serving.grid_config(shipped, bench_serving.GridSetting("w1-t2-b4-d1-nospin", 1, 2, 4, 1, False))
    assert sleeping["handler"] == {"threads": 2, "spin": False}
    assert shipped["handler"] == {"threads": 2}  # the shipped config is not changed
    assert bench_serving.settings_text(config) == "2 x 1, 4, 5 ms"


def _row(variant, concurrency, req_s, p50_ms, conv_net="m"):
    return {"conv_net": conv_net, "variant": variant, "concurrency": concurrency, "req_s": req_s, "p50_ms": p50_ms,
            "settings": variant, "engine": "onnx"}


def test_selection_rule_and_targets():
    """Latency target first; within 5% of the most req/s, fewer workers; the ratios of the same run."""
    inprocess = [{"conv_net": "m", "engine": "torch", "available": True, "batched_img_s": {"8": 40.0},
                  "single_p50_ms": 30.0},
                 {"conv_net": "m", "engine": "onnx", "available": True, "batched_img_s": {"8": 100.0},
                  "single_p50_ms": 10.0}]
    rows = [_row("w2-t1-b8-d1", 16, 200.0, 20.0),  # the most req/s, but 10 ms over in-process: not eligible
            _row("w2-t1-b8-d1", 1, 50.0, 20.0),
            _row("w2-t1-b4-d1", 16, 104.0, 12.0), _row("w2-t1-b4-d1", 1, 80.0, 12.0),
            _row("w1-t2-b4-d1", 16, 100.0, 14.0), _row("w1-t2-b4-d1", 1, 70.0, 14.0),  # within 5%: 1 worker wins
            _row("w1-t2-b1", 16, 90.0, 11.0), _row("w1-t2-b1", 1, 90.0, 11.0)]
    choice = bench_serving.pick_best("m", rows, inprocess, ["w2-t1-b8-d1", "w2-t1-b4-d1", "w1-t2-b4-d1",
                                                            "w1-t2-b1"], [1, 16])
    assert choice["variant"] == "w1-t2-b4-d1"
    assert choice["throughput_ratio"] == pytest.approx(100.0 / 40.0) and choice["meets_throughput"]
    assert choice["p50_gap_ms"] == pytest.approx(4.0) and choice["meets_p50"]
    assert choice["vs_inprocess_onnx"] == pytest.approx(1.0)
    lines = bench_serving.target_lines([choice])
    assert "2.50x in-process PyTorch eager at batch 8 (target >= 2.5x): met" in lines[0]
    assert "+4.0 ms (target <= +5 ms): met" in lines[1]
    missed = bench_serving.summarize("m", rows, inprocess, "w2-t1-b8-d1", [1, 16])
    assert missed["meets_throughput"] and not missed["meets_p50"]
    assert "missed by 5.0 ms" in bench_serving.target_lines([missed])[1]


def test_engines_from_the_model_log():
    log = ("2026-01-01T00:00:00,000 [INFO ] W-9000-base_cnn__torch_1.0-stdout MODEL_LOG - base_cnn ready: torch "
           "engine, img_size=64 (from the weights), labels={0: 'cat', 1: 'dog'}, threads=1\n"
           "2026-01-01T00:00:00,000 [INFO ] W-9001-base_cnn_1.0-stdout MODEL_LOG - base_cnn ready: onnx engine, "
           "img_size=64 (from the weights), labels={0: 'cat', 1: 'dog'}, threads=1\n")
    assert bench_serving.engines_from_log(log) == {"base_cnn__torch": "torch", "base_cnn": "onnx"}

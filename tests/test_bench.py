"""The benchmark scripts' own smoke runs: they start, print their tables and write JSON of the
right shape. No timing is asserted anywhere (a smoke run measures nothing)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from models import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, tmp_path, *args, timeout=900):
    out = str(tmp_path / (script + ".json"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script + ".py"), "--smoke", "--out", out,
                             *args], cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:]
    with open(out) as f:
        payload = json.load(f)
    assert payload["smoke"] is True
    assert payload["machine"]["logical_cpus"] >= 1 and payload["machine"]["torch"]
    return result.stdout, payload


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("|")]


def test_train_throughput_smoke(tmp_path):
    stdout, payload = run_bench("train_throughput", tmp_path, "--models", "base_cnn", "efficientnet_lite0")
    assert "SMOKE RUN" in stdout
    lines = table_lines(stdout)
    assert lines[0].startswith("| model ") and "naive img/s" in lines[0]
    assert len(lines) == 2 + 2  # header, rule, one row per model
    assert [r["conv_net"] for r in payload["results"]] == ["base_cnn", "efficientnet_lite0"]
    for r in payload["results"]:
        for key in ("naive_img_s", "project_img_s", "project_amortized_img_s", "decode_img_s", "decode_once_s",
                    "speedup_steady", "speedup_amortized"):
            assert isinstance(r[key], float) and r[key] > 0, (key, r)
        assert r["precision"] in ("fp32", "bf16")
        assert "%.2fx" % r["speedup_steady"] in stdout


def test_inference_smoke(tmp_path):
    stdout, payload = run_bench("inference", tmp_path, "--models", "base_cnn")
    lines = table_lines(stdout)
    assert "single p50 ms" in lines[0]
    rows = payload["results"]
    assert [(r["conv_net"], r["layout"]) for r in rows] == [("base_cnn", "channels_last"), ("base_cnn", "nchw")]
    for r in rows:
        assert r["single_p50_ms"] > 0 and r["single_p99_ms"] >= r["single_p50_ms"]
        assert r["best_batched_img_s"] > 0 and r["forward_only_img_s"] > 0
        assert r["img_size"] == MODELS["base_cnn"].img_size  # random weights at the model's default size
    assert len(lines) == 2 + len(rows)


@pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 11+")
def test_serving_smoke(tmp_path):
    stdout, payload = run_bench("serving", tmp_path, "--grid")
    rows = payload["rows"]
    variants = sorted({r["variant"] for r in rows})
    assert variants == sorted(["shipped", "stock", "w1-t2-b4-d1", "w2-t1-b4-d1"])
    assert {r["concurrency"] for r in rows} == {1, 4}
    assert len(rows) == len(variants) * 2
    for r in rows:
        assert r["errors"] == 0, r  # every request answered 200
        assert r["ok"] == r["requests"] > 0 and r["req_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        answer = json.loads(r["sample_answer"])
        if r["variant"] == "stock":
            assert set(answer) == {"cat", "dog"}  # top 2 of 2 classes
        else:
            assert len(answer) == 1 and set(answer) <= {"cat", "dog"}
    # the unmodified stock handler (topk=5) cannot answer for 2 classes
    assert payload["extra"]["stock_top5_answer"]["status"] != 200
    summary = {s["variant"]: s for s in payload["summary"]}
    assert summary["shipped"]["vs_stock"] > 0 and summary["shipped"]["vs_inprocess"] > 0
    assert payload["best"]["base_cnn"]["variant"] in variants
    assert "Against the targets" in stdout and "best grid setting for base_cnn" in stdout

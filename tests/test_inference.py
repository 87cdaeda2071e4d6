"""models/inference.py and the engines: ONNX export checked against torch, current/stale exports,
--backend on predict, both kinds of archive, and the handler on an ONNX model."""
import csv
import json
import os
import shutil
import subprocess
import sys
import uuid
import zipfile

import pytest
import torch

from models import CLASSES, build_model, set_serving_size, shipped_models
from models.checkpoint import Checkpoint, save_model, sidecar_path
from models.inference import ExportError, Predictor, current_onnx, default_backend, export_onnx, onnx_metadata
from tests.serving_utils import REPO_ROOT, TEST1_DIR, TRAIN_DIR, fixture_bytes, run_archive

IMAGES = sorted(os.path.join(d, n) for d in (TEST1_DIR, TRAIN_DIR) for n in os.listdir(d))


def saved(path, conv_net="base_cnn", img_size=32, seed=0):
    torch.manual_seed(seed)
    model = build_model(conv_net)
    set_serving_size(model, img_size)
    save_model(model, dict(conv_net=conv_net, img_size=img_size, classes=list(CLASSES), dropout=0.1), str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved(tmp_path_factory.mktemp("onnx") / "model_base_cnn.pth")


def probabilities(predictor):
    return torch.tensor([probs for _, probs in predictor.predict_files(IMAGES, batch_size=5, num_workers=0)])


def test_onnx_runtime_is_the_default_backend():
    assert default_backend() == "onnx"


def test_export_computes_what_torch_computes_at_any_batch_size(checkpoint):
    path, worst = export_onnx(Checkpoint("base_cnn", checkpoint))
    assert path == sidecar_path(checkpoint, ".onnx") and worst <= 1e-4
    onnx, reference = Predictor.open("base_cnn", checkpoint, "onnx"), Predictor.open("base_cnn", checkpoint, "torch")
    assert onnx.onnx_path == path and onnx.img_size == reference.img_size == 32
    assert (probabilities(onnx) - probabilities(reference)).abs().max() <= 1e-4  # batches of 5 and a last one of 3
    single = torch.tensor([onnx.classify(p) for p in IMAGES[:3]])
    assert (single - probabilities(reference)[:3]).abs().max() <= 1e-4
    meta = onnx_metadata(current_onnx(Checkpoint("base_cnn", checkpoint)))
    assert meta["source_sha256"] == Checkpoint("base_cnn", checkpoint).sha256 and meta["conv_net"] == "base_cnn"
    assert meta["img_size"] == "32" and meta["classes"] == "cat,dog"


def test_stale_export_is_replaced_from_the_new_weights(tmp_path, capsys):
    model_path = saved(tmp_path / "model_base_cnn.pth", seed=1)
    export_onnx(Checkpoint("base_cnn", model_path))
    saved(model_path, seed=2)  # retrained: the export beside it no longer matches
    assert current_onnx(Checkpoint("base_cnn", model_path)) is None
    onnx = Predictor.open("base_cnn", model_path, "onnx")
    assert "missing or older than the weights" in capsys.readouterr().err
    assert current_onnx(Checkpoint("base_cnn", model_path)) is not None
    assert (probabilities(onnx) - probabilities(Predictor.open("base_cnn", model_path, "torch"))).abs().max() <= 1e-4


def test_an_export_outside_the_limit_fails_and_writes_nothing(tmp_path):
    model_path = saved(tmp_path / "model_base_cnn.pth")
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(Checkpoint("base_cnn", model_path), atol=-1.0)  # a limit no export meets: the comparison decides
    assert not os.path.exists(sidecar_path(model_path, ".onnx"))
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp")] == []


def run_cli(*args):
    return subprocess.run([sys.executable] + list(args), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600)


def test_export_main_writes_once_and_says_when_current(tmp_path):
    model_path = saved(tmp_path / "model_base_cnn.pth")
    first = run_cli("export_main.py", "--model_path", model_path)
    assert first.returncode == 0 and "wrote %s" % sidecar_path(model_path, ".onnx") in first.stdout, first.stderr
    mtime = os.stat(sidecar_path(model_path, ".onnx")).st_mtime_ns
    again = run_cli("export_main.py", "--model_path", model_path)
    assert again.returncode == 0 and "is current" in again.stdout
    assert os.stat(sidecar_path(model_path, ".onnx")).st_mtime_ns == mtime
    missing = run_cli("export_main.py", "--model_path", str(tmp_path / "nope.pth"))
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "no checkpoint" in missing.stderr


def test_predict_backends_write_the_same_submission(checkpoint, tmp_path):
    rows = {}
    for backend in ("onnx", "torch"):
        out = tmp_path / ("%s.csv" % backend)
        result = run_cli("predict_main.py", "--model_path", checkpoint, "--img_dir", TEST1_DIR, "--csv", str(out),
                         "--backend", backend, "--threads", "1")
        assert result.returncode == 0, result.stderr
        with open(out) as f:
            rows[backend] = {r["id"]: float(r["label"]) for r in csv.DictReader(f)}
    assert rows["onnx"].keys() == rows["torch"].keys() and len(rows["onnx"]) == len(os.listdir(TEST1_DIR))
    assert max(abs(rows["onnx"][k] - rows["torch"][k]) for k in rows["onnx"]) <= 1e-4


def manifest(archive_path):
    with zipfile.ZipFile(archive_path) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"], sorted(z.namelist())


def test_archive_backends_and_an_unchanged_rebuild(checkpoint, tmp_path):
    onnx_store, torch_store = str(tmp_path / "onnx"), str(tmp_path / "torch")
    for args in (["--export-path", onnx_store], ["--backend", "torch", "--export-path", torch_store]):
        result = run_archive(*(args + ["base_cnn=%s" % checkpoint]))
        assert result.returncode == 0, result.stdout
    model, names = manifest(os.path.join(onnx_store, "base_cnn.mar"))
    assert model["serializedFile"] == "model_base_cnn.onnx" and "modelFile" not in model
    assert "base_cnn.py" not in names and "handler.py" in names and "model_base_cnn.json" in names
    model, names = manifest(os.path.join(torch_store, "base_cnn.mar"))
    assert model["serializedFile"] == "model_base_cnn.pth" and model["modelFile"] == "base_cnn.py"
    # Rebuilding an unchanged model leaves the archive as it is (a tracked .mar stays clean).
    before = open(os.path.join(onnx_store, "base_cnn.mar"), "rb").read()
    result = run_archive("--export-path", onnx_store, "base_cnn=%s" % checkpoint)
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stdout
    assert open(os.path.join(onnx_store, "base_cnn.mar"), "rb").read() == before
    # One that differs replaces it, and the one it replaces is kept beside it, as training keeps a model: under
    # a name that neither TorchServe's load_models=all nor the Dockerfile's model-store/*.mar picks up.
    result = run_archive("--backend", "torch", "--export-path", onnx_store, "base_cnn=%s" % checkpoint)
    assert result.returncode == 0, result.stdout
    kept = [n for n in os.listdir(onnx_store) if n.startswith("base_cnn.mar.previous-")]
    assert len(kept) == 1 and "kept the previous base_cnn.mar as %s" % os.path.join(onnx_store, kept[0]) in result.stdout
    assert open(os.path.join(onnx_store, kept[0]), "rb").read() == before
    assert manifest(os.path.join(onnx_store, "base_cnn.mar"))[0]["serializedFile"] == "model_base_cnn.pth"
    bad = run_archive("--backend", "tensorrt", "base_cnn=%s" % checkpoint)
    assert bad.returncode == 2 and "--backend must be onnx or torch" in bad.stdout


# ---- the handler on an ONNX model -------------------------------------------------------------------

def test_handler_serves_an_onnx_model_like_the_torch_one(checkpoint, tmp_path):
    ts_context = pytest.importorskip("ts.context")
    from ts.metrics.metrics_store import MetricsStore

    from models.handler import DogsVsCatsHandler
    export_onnx(Checkpoint("base_cnn", checkpoint))
    model_dir = tmp_path / "unpacked"
    model_dir.mkdir()
    for path in (sidecar_path(checkpoint, ".onnx"), os.path.splitext(checkpoint)[0] + ".json",
                 os.path.join(REPO_ROOT, "models", "index_to_name.json")):
        shutil.copy(path, str(model_dir))
    manifest = {"model": {"modelName": "base_cnn", "serializedFile": "model_base_cnn.onnx", "handler": "handler.py",
                          "modelVersion": "1.0"}}
    context = ts_context.Context("base_cnn", str(model_dir), manifest, 2, None, "0.12.0", True,
                                 MetricsStore(uuid.uuid4(), "base_cnn"), {"handler": {"threads": 1, "spin": False}})
    handler = DogsVsCatsHandler()
    handler.initialize(context)
    assert handler.engine == "onnx" and handler.img_size == 32
    images = [fixture_bytes(n) for n in ("1.jpg", "2.jpg", "3.jpg", "2124.jpg")] + [b"not an image"]
    context.request_processor = [ts_context.RequestProcessor({}) for _ in images]
    answers = handler.handle([{"body": b} for b in images], context)
    assert context.get_response_status(4)[0] == 415  # a bad request still fails alone
    reference = Predictor.open("base_cnn", checkpoint, "torch")
    for data, answer in zip(images[:4], answers[:4]):
        (label, p), = json.loads(answer).items()
        assert p == pytest.approx(reference.classify(data)[CLASSES.index(label)], abs=1e-4)


def test_an_onnx_model_without_onnx_runtime_says_what_to_install(checkpoint):
    export_onnx(Checkpoint("base_cnn", checkpoint))
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from models.handler import onnx_session\n"
            "try:\n    onnx_session(sys.argv[1])\nexcept RuntimeError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code, sidecar_path(checkpoint, ".onnx")], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert "pip install onnxruntime" in result.stdout and "--backend torch" in result.stdout


SHIPPED = shipped_models()


@pytest.mark.parametrize("conv_net", SHIPPED)
def test_shipped_export_is_current_and_agrees_with_torch(conv_net):
    """The shipped .onnx beside the shipped weights was exported from them, and computes what they compute."""
    weights = os.path.join(REPO_ROOT, "models", conv_net, "model_%s.pth" % conv_net)
    assert current_onnx(Checkpoint(conv_net, weights)) is not None, \
        "stale or missing: python export_main.py --conv_net %s" % conv_net
    onnx, reference = Predictor.open(conv_net, weights, "onnx"), Predictor.open(conv_net, weights, "torch")
    assert onnx.onnx_path == sidecar_path(weights, ".onnx")
    assert (probabilities(onnx) - probabilities(reference)).abs().max() <= 1e-4


def test_a_first_export_reads_loads_hashes_and_runs_the_checkpoint_once(tmp_path, monkeypatch):
    """Predictor on a checkpoint with no export yet: its meta JSON is read once, its weights loaded once and
    hashed once, and the ONNX Runtime session the export was checked with is the one that serves."""
    import functools
    from models import checkpoint as checkpoint_module
    from models import inference
    model_path = saved(tmp_path / "model_base_cnn.pth")
    calls = {"read_meta": 0, "load_checkpoint": 0, "sha256": 0, "onnx_session": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(checkpoint_module, "read_meta", counting("read_meta", checkpoint_module.read_meta))
    monkeypatch.setattr(checkpoint_module, "load_checkpoint",
                        counting("load_checkpoint", checkpoint_module.load_checkpoint))
    hashing = functools.cached_property(counting("sha256", Checkpoint.__dict__["sha256"].func))
    hashing.__set_name__(Checkpoint, "sha256")
    monkeypatch.setattr(Checkpoint, "sha256", hashing)
    monkeypatch.setattr(inference, "onnx_session", counting("onnx_session", inference.onnx_session))
    predictor = Predictor.open("base_cnn", model_path, "onnx")
    assert calls == {"read_meta": 1, "load_checkpoint": 1, "sha256": 1, "onnx_session": 1}, calls
    assert predictor.onnx_path == sidecar_path(model_path, ".onnx") and os.path.isfile(predictor.onnx_path)


def test_the_serving_size_order_falls_back_to_the_serving_size_not_the_training_size(tmp_path):
    """EfficientNet-Lite0 carries no img_size buffer: without its JSON, the registry's serving size (224), the
    size the handler falls back to too, not its training size (192)."""
    from models import MODELS, save_untrained
    from models.handler import FALLBACK_IMG_SIZE, pick_img_size
    path = save_untrained(str(tmp_path), "efficientnet_lite0")
    os.remove(os.path.splitext(path)[0] + ".json")
    spec = MODELS["efficientnet_lite0"]
    assert spec.img_size == 192 and spec.eval_img_size == 224 == FALLBACK_IMG_SIZE
    assert Checkpoint("efficientnet_lite0", path).img_size == 224
    assert pick_img_size(None, None, None) == (FALLBACK_IMG_SIZE, "the fallback")
    assert pick_img_size(64, 32, 48, 224) == (64, "the model config")
    assert pick_img_size(None, 32, 48, 224) == (32, "the weights")
    assert pick_img_size(None, None, 48, 224) == (48, "the meta JSON")

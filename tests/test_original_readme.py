"""The original README's network and commands, exactly as it wrote them.

The commands run as literal strings, from the root of a copy of this repository (its
tracked files, with the fixture images where the README's Data section puts the Kaggle
ones: data/train and data/test1), so nothing they write touches the checkout under test.
Where a command would train for hours it is shrunk with flags appended at the end (the
last occurrence of a flag wins), as a user trying it would.

VGG19-bn is 533 MB of weights, and every save, load or zip of it costs seconds, so the module
makes one VGG checkpoint, the README's way: its training command trains a step from local
ImageNet-format weights and saves it, its archiver command packs that very checkpoint, and
TorchServe and predict_main.py (the README's predict command included) serve it.
"""
import concurrent.futures
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.serving_utils import (REPO_ROOT, TEST1_DIR, TRAIN_DIR, VENV_BIN, TorchServe, dog_probability,
                                 fixture_bytes, post, read_json_response)
from tests.support import OFFLINE_ENV

# The original README's commands, verbatim (its line continuations included).
ORIGINAL_TRAIN = {
    "base_cnn": """python train_main.py --conv_net base_cnn --dropout 0.2 --batch_size 32 \\
                     --validation_split 0.1 --lr 1e-3 \\
                     --weight_decay 0 --betas 0.9 0.999 --epochs 10 \\
                     --model_path models/base_cnn/model_base_cnn.pth""",
    "vgg": """python train_main.py --conv_net vgg --dropout 0.5 --batch_size 32 \\
                     --validation_split 0.1 --lr 1e-3 \\
                     --weight_decay 0 --betas 0.9 0.999 --epochs 3 \\
                     --model_path models/vgg/model_vgg.pth \\
""",
}
ORIGINAL_ARCHIVE = {
    "base_cnn": """torch-model-archiver --model-name base_cnn  --version 1.0 --model-file models/base_cnn/base_cnn.py \\
                     --serialized-file models/base_cnn/model_base_cnn.pth  --extra-files models/index_to_name.json \\
                     --handler models/handler.py --export-path deployment/model-store -f""",
    "vgg": """torch-model-archiver --model-name vgg  --version 1.0 --model-file models/vgg/vgg.py \\
                     --serialized-file models/vgg/model_vgg.pth  --extra-files models/index_to_name.json \\
                     --handler models/handler.py --export-path deployment/model-store -f""",
}
ORIGINAL_PREDICT = ("python predict_main.py --conv_net vgg --img_path data/test1/2124.jpg "
                    "--model_path models/vgg/model_vgg.pth")
# Small enough for a quick smoke run on the fixtures; VGG19 at 32 px still has every layer (its five
# 2x2 poolings end at 1 px, then its adaptive pooling).
SHRINK = " --img_size 32 --num_workers 0 --dry-run"
# VGG: one epoch too. Each epoch of a run writes its 533 MB model and a --resume checkpoint three times
# that size (Adam's state); what later epochs do is the same for every network, and base_cnn's command
# runs all of its 10.
VGG_SHRINK = SHRINK + " --epochs 1"


def user_copy(directory):
    """The repository as a clone has it (its tracked and new, not ignored, files) plus the fixture images in data/."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        if rel and os.path.isfile(os.path.join(REPO_ROOT, rel)):
            os.makedirs(os.path.join(directory, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, rel), os.path.join(directory, rel))
    shutil.copytree(TRAIN_DIR, os.path.join(directory, "data", "train"))
    shutil.copytree(TEST1_DIR, os.path.join(directory, "data", "test1"))
    return directory


def shell(command, cwd, timeout=900, env=None):
    """A README command in bash, with the virtualenv activated (its python, torchserve, archiver).
    env: added variables."""
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), MPLBACKEND="Agg", **(env or {}))
    env.pop("DISPLAY", None)
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- the network ---------------------------------------------------------------------------------

def test_base_cnn_is_the_original_network():
    """4 blocks of Conv -> BatchNorm -> ReLU -> Dropout -> MaxPool(2), 64/128/256/512 channels,
    then a classifier with one hidden fully connected layer of 100 units."""
    from models.base_cnn.base_cnn import BaseCNN
    model = BaseCNN()
    layers = list(model.features)
    assert len(layers) == 4 * 5
    in_ch = 3
    for block, out_ch in enumerate((64, 128, 256, 512)):
        conv, bn, relu, drop, pool = layers[5 * block: 5 * block + 5]
        assert [type(m) for m in (conv, bn, relu, drop, pool)] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Dropout,
                                                                  nn.MaxPool2d]
        assert (conv.in_channels, conv.out_channels, conv.stride, conv.groups) == (in_ch, out_ch, (1, 1), 1)
        assert bn.num_features == out_ch and pool.kernel_size == 2 and pool.stride == 2
        in_ch = out_ch
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 100), (100, 2)]
    between = list(model.classifier)[list(model.classifier).index(linears[0]) + 1:
                                     list(model.classifier).index(linears[1])]
    assert any(isinstance(m, nn.ReLU) for m in between)  # an activation in the hidden layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4
    for size in (32, 64, 72, 200):  # global pooling: every input size works
        assert model.eval()(torch.zeros(1, 3, size, size)).shape == (1, 2)


# ---- training --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def training_copy(tmp_path_factory):
    return user_copy(str(tmp_path_factory.mktemp("original-train")))


@pytest.fixture(scope="module")
def training_runs(training_copy, tmp_path_factory):
    """The README's training commands in the copy: {"base_cnn" | "vgg_offline" | "vgg": the CompletedProcess}.

    base_cnn's and VGG's offline run (which stops before it writes anything) are mostly Python starting:
    they run side by side while this process makes the local ImageNet-format VGG weights. VGG's training
    from them runs alone (two trainings at once, each with a thread per core, only slow each other down);
    its checkpoint is the one the module archives and serves."""
    from torchvision.models import vgg19_bn
    weights = str(tmp_path_factory.mktemp("imagenet-format") / "vgg19_bn-imagenet-format.pth")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = {"base_cnn": pool.submit(shell, ORIGINAL_TRAIN["base_cnn"] + SHRINK, training_copy),
                "vgg_offline": pool.submit(shell, ORIGINAL_TRAIN["vgg"] + SHRINK, training_copy, timeout=300,
                                           env=OFFLINE_ENV)}
        torch.manual_seed(0)
        torch.save(vgg19_bn(weights=None).state_dict(), weights)  # the layout of torchvision's ImageNet file
        runs = {name: run.result() for name, run in runs.items()}
    try:
        runs["vgg"] = shell(ORIGINAL_TRAIN["vgg"].rstrip().rstrip("\\") + " --pretrained_weights " + weights
                            + VGG_SHRINK, training_copy)
    finally:
        os.remove(weights)
    return runs


def test_original_base_cnn_training_command(training_copy, training_runs):
    result = training_runs["base_cnn"]
    assert result.returncode == 0, result.stderr
    assert "epoch   1" in result.stdout
    state = torch.load(os.path.join(training_copy, "models/base_cnn/model_base_cnn.pth"), weights_only=True)
    assert int(state["img_size"]) == 32  # the weights carry the size they are fed at


def test_original_vgg_training_command_offline_is_one_line(training_runs):
    result = training_runs["vgg_offline"]
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pretrained_weights PATH" in lines[0], result.stderr


def test_original_vgg_training_command_with_local_weights(training_copy, training_runs):
    result = training_runs["vgg"]
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(training_copy, "models/vgg/model_vgg.pth"))


# ---- archiving, serving and predicting ------------------------------------------------------------

@pytest.fixture(scope="module")
def served_copy(tmp_path_factory, training_copy, training_runs):
    """A copy with the shipped base_cnn weights and the VGG19-bn the README's training command saved
    (hard-linked, with its meta JSON: the same 533 MB, not written again)."""
    directory = user_copy(str(tmp_path_factory.mktemp("original-serve")))
    for name in ("model_vgg.pth", "model_vgg.json"):
        src, dst = os.path.join(training_copy, "models", "vgg", name), os.path.join(directory, "models", "vgg", name)
        assert os.path.isfile(src), "the README's VGG training command saved no %s:\n%s" % (
            name, training_runs["vgg"].stderr)
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)
    return directory


@pytest.fixture(scope="module")
def original_archives(served_copy, tmp_path_factory):
    """The README's two archiver commands, verbatim, and (meanwhile, on the other core) its predict command,
    verbatim: (the model store, the predict command's result). Zipping the 533 MB VGG and the predict
    command's first ONNX export of it are the two long steps, and neither reads what the other writes.
    The archiver stages the files in $TMPDIR/MODEL_NAME and deletes that folder: a TMPDIR of its own
    keeps another archiver run of vgg or base_cnn on this machine out of it."""
    store = os.path.join(served_copy, "deployment", "model-store")
    archiver_env = {"TMPDIR": str(tmp_path_factory.mktemp("archiver-tmp"))}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        predict = pool.submit(shell, ORIGINAL_PREDICT, served_copy)
        archived = [shell(ORIGINAL_ARCHIVE[name], served_copy, env=archiver_env) for name in ("vgg", "base_cnn")]
        predict = predict.result()
    for result in archived:
        assert result.returncode == 0, result.stderr
    return store, predict


def predict_csv(directory, conv_net, model_path):
    """predict_main.py's Kaggle submission for data/test1, run in this process (the README's predict command
    runs as a user types it in original_archives)."""
    import predict_main
    out = os.path.join(directory, conv_net + ".csv")
    predict_main.main(["--conv_net", conv_net, "--model_path", os.path.join(directory, model_path),
                       "--img_dir", os.path.join(directory, "data", "test1"), "--csv", out, "--num_workers", "0"])
    with open(out) as f:
        return {row["id"] + ".jpg": float(row["label"]) for row in csv.DictReader(f)}


def test_original_archives_hold_only_the_four_files(original_archives):
    import zipfile
    store, _ = original_archives
    for name in ("base_cnn", "vgg"):
        with zipfile.ZipFile(os.path.join(store, name + ".mar")) as mar:
            assert sorted(mar.namelist()) == sorted(["MAR-INF/MANIFEST.json", "handler.py", name + ".py",
                                                     "model_%s.pth" % name, "index_to_name.json"])


def test_original_archives_serve_like_predict_main(served_copy, original_archives, tmp_path):
    store, result = original_archives
    models = {"vgg": "vgg.mar", "base_cnn": "base_cnn.mar"}  # the README's --models vgg=vgg.mar base_cnn=base_cnn.mar
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        # predict_main.py's answers, computed while the server starts (its frontend and workers are other processes)
        expected = pool.submit(lambda: {name: predict_csv(served_copy, name, "models/%s/model_%s.pth" % (name, name))
                                        for name in ("base_cnn", "vgg")})
        with TorchServe(str(tmp_path), store, models) as ts:
            expected = expected.result()
            for name in models:
                for image, want in expected[name].items():
                    response = post(ts.predict_url(name), fixture_bytes(image))
                    assert response.status_code == 200, response.text
                    answer = read_json_response(response)
                    assert set(answer) == {"dog" if want >= 0.5 else "cat"}
                    assert dog_probability(answer) == pytest.approx(want, abs=1e-4), (name, image)

    # The README's predict command, as written (run by original_archives): the same label for 2124.jpg.
    assert result.returncode == 0, result.stderr
    label = "dog" if expected["vgg"]["2124.jpg"] >= 0.5 else "cat"
    assert "data/test1/2124.jpg: %s" % label in result.stdout


def test_readme_torchserve_command_without_vgg_mar_serves_base_cnn(tmp_path):
    """--models vgg=vgg.mar base_cnn=base_cnn.mar with no vgg.mar: TorchServe logs it and serves the rest."""
    store = str(tmp_path / "store")
    os.makedirs(store)
    shutil.copy(os.path.join(REPO_ROOT, "deployment", "model-store", "base_cnn.mar"), store)
    server = TorchServe(str(tmp_path / "server"), store, {"vgg": "vgg.mar", "base_cnn": "base_cnn.mar"},
                        wait_for=["base_cnn"])
    with server as ts:
        assert post(ts.predict_url("base_cnn"), fixture_bytes("2124.jpg")).status_code == 200
        response = post(ts.predict_url("vgg"), fixture_bytes("2124.jpg"))
        assert response.status_code == 404 and "Model not found: vgg" in response.text
        with open(ts.out_path) as f:
            assert "Failed to load model: vgg.mar" in f.read()


def test_readme_shows_the_original_commands_exactly():
    def words(text):
        return " ".join(text.replace("\\\n", " ").split())
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = words(f.read())
    torchserve = ("torchserve --start --ncs --ts-config deployment/config.properties --model-store "
                  "deployment/model-store --models vgg=vgg.mar base_cnn=base_cnn.mar")
    for command in list(ORIGINAL_TRAIN.values()) + list(ORIGINAL_ARCHIVE.values()) + [ORIGINAL_PREDICT, torchserve]:
        assert words(command) in readme, command

"""The original README's network and commands, exactly as it wrote them.

The commands run as literal strings, from the root of a copy of this repository (its
tracked files, with the fixture images where the README's Data section puts the Kaggle
ones: data/train and data/test1), so nothing they write touches the checkout under test.
Where a command would train for hours it is shrunk with flags appended at the end (the
last occurrence of a flag wins), as a user trying it would.
"""
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
# Small enough for a quick smoke run on the fixtures; VGG19 at 64 px still has every layer.
SHRINK = " --img_size 32 --num_workers 0 --dry-run"
VGG_TEST_SIZE = 64


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
    """A README command in bash, with the virtualenv activated (its python, torchserve, archiver)."""
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


def test_original_base_cnn_training_command(training_copy):
    result = shell(ORIGINAL_TRAIN["base_cnn"] + SHRINK, training_copy)
    assert result.returncode == 0, result.stderr
    assert "epoch   1" in result.stdout
    state = torch.load(os.path.join(training_copy, "models/base_cnn/model_base_cnn.pth"), weights_only=True)
    assert int(state["img_size"]) == 32  # the weights carry the size they are fed at


def test_original_vgg_training_command_offline_is_one_line(training_copy):
    result = shell(ORIGINAL_TRAIN["vgg"] + SHRINK, training_copy, timeout=300, env=OFFLINE_ENV)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pretrained_weights PATH" in lines[0], result.stderr


def test_original_vgg_training_command_with_local_weights(training_copy, tmp_path):
    from torchvision.models import vgg19_bn
    weights = str(tmp_path / "vgg19_bn-imagenet-format.pth")
    torch.save(vgg19_bn(weights=None).state_dict(), weights)  # the layout of torchvision's ImageNet file
    result = shell(ORIGINAL_TRAIN["vgg"].rstrip().rstrip("\\") + " --pretrained_weights " + weights + SHRINK,
                   training_copy)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(training_copy, "models/vgg/model_vgg.pth"))


# ---- archiving, serving and predicting ------------------------------------------------------------

@pytest.fixture(scope="module")
def served_copy(tmp_path_factory):
    """A copy with the shipped base_cnn weights and a random VGG19-bn saved as training saves it."""
    from models import build_model, set_serving_size
    from models.checkpoint import save_model
    directory = user_copy(str(tmp_path_factory.mktemp("original-serve")))
    torch.manual_seed(0)
    vgg = build_model("vgg")
    set_serving_size(vgg, VGG_TEST_SIZE)
    save_model(vgg, {"conv_net": "vgg", "img_size": VGG_TEST_SIZE}, os.path.join(directory, "models/vgg/model_vgg.pth"))
    return directory


@pytest.fixture(scope="module")
def original_archives(served_copy):
    store = os.path.join(served_copy, "deployment", "model-store")
    for name in ("base_cnn", "vgg"):
        result = shell(ORIGINAL_ARCHIVE[name], served_copy)
        assert result.returncode == 0, result.stderr
    return store


def predict_csv(directory, conv_net, model_path):
    out = os.path.join(directory, conv_net + ".csv")
    result = shell("python predict_main.py --conv_net %s --model_path %s --img_dir data/test1 --csv %s "
                   "--num_workers 0" % (conv_net, model_path, out), directory)
    assert result.returncode == 0, result.stderr
    with open(out) as f:
        return {row["id"] + ".jpg": float(row["label"]) for row in csv.DictReader(f)}


def test_original_archives_hold_only_the_four_files(original_archives):
    import zipfile
    for name in ("base_cnn", "vgg"):
        with zipfile.ZipFile(os.path.join(original_archives, name + ".mar")) as mar:
            assert sorted(mar.namelist()) == sorted(["MAR-INF/MANIFEST.json", "handler.py", name + ".py",
                                                     "model_%s.pth" % name, "index_to_name.json"])


def test_original_archives_serve_like_predict_main(served_copy, original_archives, tmp_path):
    expected = {name: predict_csv(served_copy, name, "models/%s/model_%s.pth" % (name, name))
                for name in ("base_cnn", "vgg")}
    models = {"vgg": "vgg.mar", "base_cnn": "base_cnn.mar"}  # the README's --models vgg=vgg.mar base_cnn=base_cnn.mar
    with TorchServe(str(tmp_path), original_archives, models) as ts:
        for name in models:
            for image, want in expected[name].items():
                response = post(ts.predict_url(name), fixture_bytes(image))
                assert response.status_code == 200, response.text
                answer = read_json_response(response)
                assert set(answer) == {"dog" if want >= 0.5 else "cat"}
                assert dog_probability(answer) == pytest.approx(want, abs=1e-4), (name, image)

    # The README's predict command, as written: the same label for 2124.jpg.
    result = shell(ORIGINAL_PREDICT, served_copy)
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

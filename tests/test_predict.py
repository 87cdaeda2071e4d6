"""predict_main.py: one image (label, probability, figure) and a folder (Kaggle submission CSV)."""
import csv
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.support import REPO_ROOT, TEST1_DIR, TRAIN_DIR, run_cli
import predict_main
from models.inference import Predictor
from models import CLASSES, build_model, set_serving_size
from dataset import _decode_one
from models.checkpoint import meta_path, save_model
from models.transforms import eval_transform, normalize, open_rgb
from tests.serving_utils import eps_bytes
from tests.helpers_training import one_thread  # noqa: F401  (autouse: torch on one thread)

IDS = ["1", "2", "3", "2124"]  # test1's fixture images, numeric order (alphabetical would put 2124 before 3)


def saved_model(path, conv_net="base_cnn", img_size=32, seed=0):
    """A randomly initialised model saved as training saves one (weights + meta JSON)."""
    torch.manual_seed(seed)
    model = build_model(conv_net)
    set_serving_size(model, img_size)  # training records the size in the weights too, and they win over the JSON
    save_model(model, dict(conv_net=conv_net, img_size=img_size, classes=list(CLASSES), dropout=0.3), str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "model_base_cnn.pth")


def expected_p_dog(path, img_size, image):
    """The probability of dog computed by hand: registry model + eval_transform + softmax."""
    model = build_model("base_cnn")
    model.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        logits = model.eval()(eval_transform(img_size)(open_rgb(image, img_size)).unsqueeze(0))
    return torch.softmax(logits, 1)[0, CLASSES.index("dog")].item()


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- a folder -> submission CSV -------------------------------------------------------------------

def test_folder_writes_a_kaggle_submission(tmp_path, model_path, capsys):
    out = tmp_path / "sub" / "submission.csv"
    predict_main.main(["--model_path", model_path, "--img_dir", TEST1_DIR, "--csv", str(out),
                       "--batch_size", "3", "--num_workers", "0"])
    rows = read_csv(out)
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == IDS
    for image_id, text in rows[1:]:
        p = float(text)
        assert 0.0 <= p <= 1.0
        assert text == repr(p)  # full precision, nothing rounded away
        assert p == pytest.approx(expected_p_dog(model_path, 32, os.path.join(TEST1_DIR, image_id + ".jpg")),
                                  abs=1e-6)
    assert "wrote 4 predictions to %s" % out in capsys.readouterr().out


def test_cli_submission_with_decoding_workers(tmp_path, model_path):
    """What the serving tests run: the real command line, several batches decoded in worker processes."""
    out = tmp_path / "submission.csv"
    result = run_cli("predict_main.py", "--conv_net", "base_cnn", "--model_path", model_path,
                     "--img_dir", TEST1_DIR, "--csv", out, "--batch_size", 2, "--num_workers", 2)
    assert result.returncode == 0, result.stderr
    rows = read_csv(out)
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == IDS
    in_process = tmp_path / "in_process.csv"
    predict_main.main(["--model_path", model_path, "--img_dir", TEST1_DIR, "--csv", str(in_process),
                       "--num_workers", "0"])
    for (_, a), (_, b) in zip(rows[1:], read_csv(in_process)[1:]):
        assert float(a) == pytest.approx(float(b), abs=1e-6)  # batch size and workers change nothing


def test_csv_to_standard_output(model_path, capsys):
    predict_main.main(["--model_path", model_path, "--img_dir", TEST1_DIR, "--csv", "-", "--num_workers", "0"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "id,label" and [line.split(",")[0] for line in lines[1:]] == IDS
    assert "wrote 4 predictions" in captured.err


def test_a_corrupt_file_is_skipped_and_the_others_written(tmp_path, model_path, capsys):
    folder = tmp_path / "test1"
    shutil.copytree(TEST1_DIR, folder)
    (folder / "5.jpg").write_bytes(b"this is not a JPEG")
    (folder / "7.jpg").write_bytes((folder / "1.jpg").read_bytes()[:600])  # truncated
    (folder / "notes.txt").write_text("not an image file, ignored")
    out = tmp_path / "submission.csv"
    predict_main.main(["--model_path", model_path, "--img_dir", str(folder), "--csv", str(out),
                       "--batch_size", "2", "--num_workers", "0"])  # returns: exit code 0
    assert [r[0] for r in read_csv(out)[1:]] == IDS
    captured = capsys.readouterr()
    assert "skipping %s" % (folder / "5.jpg") in captured.err and "skipping %s" % (folder / "7.jpg") in captured.err
    assert "2 unreadable files skipped" in captured.out


def test_nothing_readable_is_exit_2_and_no_csv(tmp_path, model_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "1.jpg").write_bytes(b"garbage")
    (folder / "2.png").write_bytes(b"")
    out = tmp_path / "submission.csv"
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--model_path", model_path, "--img_dir", str(folder), "--csv", str(out)])
    assert exit_info.value.code == 2 and not out.exists()


def test_model_trained_at_another_size_needs_no_flag(tmp_path):
    """img_size comes from the meta JSON beside the weights."""
    path = saved_model(tmp_path / "m40.pth", img_size=40, seed=1)
    predictor = Predictor.open("base_cnn", path)
    assert predictor.img_size == 40
    image = os.path.join(TEST1_DIR, "2124.jpg")
    (_, probs), = predictor.predict_files([image])
    assert probs[predictor.classes.index("dog")] == pytest.approx(expected_p_dog(path, 40, image), abs=1e-6)
    assert abs(sum(probs) - 1) < 1e-6


def test_training_prediction_and_serving_decode_a_big_jpeg_alike(tmp_path):
    """JPEG draft mode everywhere: a 3000x2000 photo is decoded at 1/8 scale by training, prediction and
    the handler (which gets the bytes), so none of them drifts from the others."""
    path = tmp_path / "dog.1.jpg"
    Image.open(os.path.join(TRAIN_DIR, "dog.3.jpg")).resize((3000, 2000)).save(path, quality=90)
    served = eval_transform(64)(open_rgb(path.read_bytes(), 64))  # models/handler.py's preprocess_one
    predictor = Predictor.open("base_cnn", saved_model(tmp_path / "m64.pth", img_size=64), "torch")
    predicted, error = predictor.decode(str(path))
    trained, _ = _decode_one((str(path), 64))
    assert error is None
    assert torch.equal(predicted, served) and torch.equal(normalize(torch.from_numpy(trained)), served)
    assert open_rgb(str(path), 64).size == (375, 250)
    assert not torch.equal(eval_transform(64)(open_rgb(str(path))), served)  # a full decode differs


def test_eps_file_is_skipped_without_reaching_its_plugin(tmp_path, eps_plugin_calls):
    path = tmp_path / "1.jpg"
    path.write_bytes(eps_bytes())
    tensor, why = Predictor.open("base_cnn", saved_model(tmp_path / "m32.pth"), "torch").decode(str(path))
    assert tensor is None and why.startswith("unsupported image format") and eps_plugin_calls == []


# ---- one image --------------------------------------------------------------------------------

def test_one_image_prints_label_and_probability_and_saves_the_figure(tmp_path, model_path, capsys):
    fig = tmp_path / "figs" / "fig.png"
    image = os.path.join(TEST1_DIR, "2124.jpg")
    label, prob = predict_main.predict_image(Predictor.open("base_cnn", model_path), image, str(fig))
    p_dog = expected_p_dog(model_path, 32, image)
    assert label == ("dog" if p_dog > 0.5 else "cat")
    assert prob == pytest.approx(max(p_dog, 1 - p_dog), abs=1e-6)
    out = capsys.readouterr().out
    assert "%s (probability %.4f)" % (label, prob) in out and "figure written to %s" % fig in out
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def headless_env():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    env["MPLBACKEND"] = "TkAgg"  # even an interactive backend asked for must not be used without a display
    return env


def test_headless_without_save_writes_the_figure_in_the_working_directory(tmp_path, model_path):
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "predict_main.py"), "--model_path", model_path,
                             "--img_path", os.path.join(TEST1_DIR, "2124.jpg")],
                            cwd=tmp_path, env=headless_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "figure written to 2124_prediction.png" in result.stdout
    assert (tmp_path / "2124_prediction.png").read_bytes()[:4] == b"\x89PNG"


def test_save_never_shows(tmp_path, model_path, monkeypatch):
    """--save writes the figure and opens no window, display or not."""
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.chdir(tmp_path)
    shown = []
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: shown.append(1))
    predict_main.main(["--model_path", model_path, "--img_path", os.path.join(TEST1_DIR, "1.jpg"),
                       "--save", "out.png"])
    assert (tmp_path / "out.png").exists() and not (tmp_path / "1_prediction.png").exists() and not shown


# ---- errors: one line and exit 2 ----------------------------------------------------------------

def test_checkpoint_of_another_model_is_one_line_and_exit_2(model_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--conv_net", "efficientnet_lite0", "--model_path", model_path,
                           "--img_path", os.path.join(TEST1_DIR, "1.jpg")])
    assert exit_info.value.code == 2
    assert "base_cnn" in one_error_line(capsys.readouterr().err)


def test_weights_of_another_model_without_meta_is_one_line_and_exit_2(tmp_path, capsys):
    """No meta JSON to read the architecture from: the state_dict itself does not fit."""
    path = saved_model(tmp_path / "weights.pth")
    os.remove(meta_path(path))
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--conv_net", "efficientnet_lite0", "--model_path", path,
                           "--img_dir", TEST1_DIR, "--csv", str(tmp_path / "x.csv")])
    assert exit_info.value.code == 2
    assert "not a efficientnet_lite0 checkpoint" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--img_path", "missing.jpg"], "image not found"),
    (["--img_dir", "missing_dir", "--csv", "x.csv"], "image folder not found"),
    (["--img_dir", "EMPTY", "--csv", "x.csv"], "no images in"),
    (["--img_dir", TEST1_DIR], "needs --csv"),
    (["--img_path", os.path.join(TEST1_DIR, "1.jpg"), "--csv", "x.csv"], "--csv goes with --img_dir"),
    (["--img_path", os.path.join(TEST1_DIR, "1.jpg"), "--batch_size", "0"], "--batch_size"),
    (["--img_path", os.path.join(TEST1_DIR, "1.jpg"), "--conv_net", "resnet"], "--conv_net"),
    ([], "--img_path --img_dir is required"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, model_path, capsys, monkeypatch, args, message):
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--model_path", model_path] + args)
    assert exit_info.value.code == 2
    assert message in one_error_line(capsys.readouterr().err)


def test_model_path_defaults_to_the_registry_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ here
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--conv_net", "base_cnn", "--img_path", os.path.join(TEST1_DIR, "1.jpg")])
    assert exit_info.value.code == 2
    assert "no checkpoint at models/base_cnn/model_base_cnn.pth" in one_error_line(capsys.readouterr().err)


def test_empty_checkpoint_is_one_line_naming_it_and_what_to_do(tmp_path):
    """Issue 17: a 0-byte .pth was an IndexError traceback. A real process: its exit status, and that it prints
    one line and no traceback (the other exit-2 tests call predict_main.main in this process)."""
    path = tmp_path / "model_base_cnn.pth"
    path.write_bytes(b"")
    result = run_cli("predict_main.py", "--model_path", path, "--img_path", os.path.join(TEST1_DIR, "1.jpg"))
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        "error: cannot load %s: the file is empty (0 bytes); pass the .pth file training wrote (--model_path), "
        "or train the model again" % path)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:len(data) // 2], "truncated, corrupt or not a PyTorch checkpoint (RuntimeError: "),
    (lambda data: b"plain text", "truncated, corrupt or not a PyTorch checkpoint ("),
    (lambda data: torch_bytes([1, 2]), "does not hold a state_dict"),
    (lambda data: torch_bytes({"fc.weight": torch.zeros(2)}), "is not a base_cnn checkpoint"),
])
def test_unusable_checkpoint_is_one_line_naming_it(tmp_path, model_path, capsys, damage, message):
    path = tmp_path / "damaged.pth"
    with open(model_path, "rb") as f:
        path.write_bytes(damage(f.read()))
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--model_path", str(path), "--img_path", os.path.join(TEST1_DIR, "1.jpg")])
    assert exit_info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and message in line


def test_weights_of_an_older_version_of_the_network_are_one_line(tmp_path, capsys):
    """The meta JSON says base_cnn, but the layers are not the current base_cnn's (a checkpoint saved
    before the network changed): say so, and that it needs training again."""
    path = saved_model(tmp_path / "old.pth")
    state = torch.load(path, weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--model_path", path, "--img_path", os.path.join(TEST1_DIR, "1.jpg")])
    assert exit_info.value.code == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: %s was trained as base_cnn, but its weights do not fit the current base_cnn network (saved by "
        "another version of it?); train the model again" % path)


def torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(SystemExit) as exit_info:
        predict_main.main(["--model_path", str(path), "--img_path", os.path.join(TRAIN_DIR, "cat.0.jpg")])
    assert exit_info.value.code == 2
    assert "cannot load" in one_error_line(capsys.readouterr().err)

"""evaluate_main.py: the figures against a hand-computed example, both data layouts, training's split."""
import json
import math
import os
import shutil

import pytest
import torch

from tests.support import REPO_ROOT, TRAIN_DIR
from tests.helpers_training import one_thread  # noqa: F401  (autouse: torch on one thread)
import evaluate_main
import train_main
from dataset import DataError, data_fingerprint, find_labeled_images, stratified_split
from evaluation.metrics import class_mapping, compute_metrics, log_loss, training_split
from models import CLASSES, build_model, set_serving_size
from models.checkpoint import save_model

CAT, DOG = CLASSES.index("cat"), CLASSES.index("dog")


def saved_model(path, img_size=32):
    torch.manual_seed(0)
    model = build_model("base_cnn")
    set_serving_size(model, img_size)  # as training does: the weights carry the size, and they win over the JSON
    save_model(model, dict(conv_net="base_cnn", img_size=img_size, classes=list(CLASSES), dropout=0.3), str(path))
    return str(path)


# ---- the figures, by hand -----------------------------------------------------------------------

def test_metrics_of_a_known_set_of_predictions():
    labels = [DOG, DOG, CAT, CAT, DOG, CAT]
    p_dog = [0.9, 0.4, 0.2, 0.7, 1.0, 0.0]
    paths = ["a", "b", "c", "d", "e", "f"]
    m = compute_metrics(labels, [[1 - p, p] for p in p_dog], CLASSES, paths=paths)
    # predicted (p > 0.5):  dog  cat  cat  dog  dog  cat  -> b and d are wrong
    assert m["images"] == 6 and m["mistakes"] == 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    #                         predicted cat, dog
    assert m["confusion_matrix"] == [[2, 1],   # true cat: c, f right; d wrong
                                     [1, 2]]   # true dog: b wrong; a, e right
    for name in ("cat", "dog"):
        assert m["per_class"][name]["precision"] == pytest.approx(2 / 3)
        assert m["per_class"][name]["recall"] == pytest.approx(2 / 3)
        assert m["per_class"][name]["support"] == 3
    # -(ln .9 + ln .4 + ln .8 + ln .3 + ln(1 - 1e-15) + ln(1 - 1e-15)) / 6: e and f are clipped, not 0
    assert m["log_loss"] == pytest.approx((0.10536051565782628 + 0.916290731874155 + 0.2231435513142097
                                           + 1.2039728043259361) / 6, rel=1e-12, abs=1e-14)
    assert m["log_loss"] == pytest.approx(0.408127933862, rel=1e-10)
    # most confidently wrong first: d (a cat at p(dog) 0.7) before b (a dog at 0.4)
    assert [(w["path"], w["true"], w["predicted"], w["p_dog"]) for w in m["worst_mistakes"]] == [
        ("d", "cat", "dog", 0.7), ("b", "dog", "cat", 0.4)]


def test_log_loss_clips_like_kaggle():
    # a certain, wrong answer costs about -ln(1e-15) = 34.54, not infinity
    assert log_loss([DOG], [0.0]) == pytest.approx(-math.log(1e-15))
    assert log_loss([CAT], [1.0]) == pytest.approx(-math.log(1 - (1 - 1e-15)))  # p clipped first, then 1 - p
    assert log_loss([DOG, CAT], [0.0, 1.0]) == pytest.approx(34.539, abs=1e-3)
    assert log_loss([DOG, CAT], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-15))
    assert log_loss([DOG], [0.5]) == pytest.approx(math.log(2))


def test_undefined_precision_is_none_and_worst_is_capped():
    m = compute_metrics([CAT, CAT, DOG], [[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]], CLASSES, worst=1)
    assert m["per_class"]["cat"]["precision"] is None  # no image predicted cat
    assert m["per_class"]["cat"]["recall"] == 0.0 and m["per_class"]["dog"]["precision"] == pytest.approx(1 / 3)
    assert m["mistakes"] == 2 and len(m["worst_mistakes"]) == 1 and m["worst_mistakes"][0]["p_dog"] == 0.9
    assert "-" in evaluate_main.format_report(dict(m, conv_net="base_cnn", model_path="m.pth", img_size=16,
                                                   data_dir="d", split="all", skipped=[]))


# ---- any number of classes, by hand ----------------------------------------------------------------

FRUIT = ("apple", "banana", "cherry")
APPLE, BANANA, CHERRY = range(3)


def three_class_metrics(**kwargs):
    labels = [APPLE, APPLE, BANANA, BANANA, CHERRY, CHERRY]
    probs = [[0.7, 0.2, 0.1],   # a: apple, right
             [0.3, 0.6, 0.1],   # b: apple as banana, p(true) .3
             [0.1, 0.8, 0.1],   # c: banana, right
             [0.5, 0.4, 0.1],   # d: banana as apple, p(true) .4
             [0.6, 0.3, 0.1],   # e: cherry as apple, p(true) .1
             [0.2, 0.5, 0.3]]   # f: cherry as banana, p(true) .3
    return compute_metrics(labels, probs, FRUIT, paths=list("abcdef"), **kwargs)


def test_metrics_of_three_classes():
    m = three_class_metrics()
    assert m["images"] == 6 and m["mistakes"] == 4 and m["accuracy"] == pytest.approx(2 / 6)
    assert m["classes"] == list(FRUIT)
    #                         predicted apple, banana, cherry
    assert m["confusion_matrix"] == [[1, 1, 0],   # true apple: a right, b as banana
                                     [1, 1, 0],   # true banana: d as apple, c right
                                     [1, 1, 0]]   # true cherry: e as apple, f as banana; never predicted
    assert m["per_class"]["apple"] == dict(precision=pytest.approx(1 / 3), recall=0.5, support=2)
    assert m["per_class"]["banana"] == dict(precision=pytest.approx(1 / 3), recall=0.5, support=2)
    assert m["per_class"]["cherry"] == dict(precision=None, recall=0.0, support=2)  # no image predicted cherry
    # multi-class log loss: -mean(ln p(true class)) = -(ln .7 + ln .3 + ln .8 + ln .4 + ln .1 + ln .3) / 6
    assert m["log_loss"] == pytest.approx((0.35667494393873245 + 1.2039728043259361 + 0.2231435513142097
                                           + 0.916290731874155 + 2.3025850929940455 + 1.2039728043259361) / 6,
                                          rel=1e-12)
    assert m["log_loss"] == pytest.approx(1.03443998812884, rel=1e-12)
    # lowest probability of the true class first; b and f tie at .3 and keep the images' order
    assert [(w["path"], w["true"], w["predicted"], w["p_true"], w["p_predicted"]) for w in m["worst_mistakes"]] == [
        ("e", "cherry", "apple", 0.1, 0.6), ("b", "apple", "banana", 0.3, 0.6),
        ("f", "cherry", "banana", 0.3, 0.5), ("d", "banana", "apple", 0.4, 0.5)]
    assert all("p_dog" not in w for w in m["worst_mistakes"])  # no dog among the classes
    assert [w["path"] for w in three_class_metrics(worst=2)["worst_mistakes"]] == ["e", "b"]


def test_multiclass_log_loss_clips():
    # a certain, wrong answer costs -ln(1e-15), not infinity; a certain right one -ln(1 - 1e-15), not 0
    m = compute_metrics([APPLE, BANANA], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], FRUIT)
    assert m["log_loss"] == pytest.approx((-math.log(1e-15) - math.log(1 - 1e-15)) / 2)
    # four classes, one image each, p(true) .25: ln 4
    four = ("a", "b", "c", "d")
    m = compute_metrics([0, 1, 2, 3], [[0.25] * 4] * 4, four)
    assert m["log_loss"] == pytest.approx(math.log(4)) and m["accuracy"] == 0.25  # argmax: the first of equals


def kaggle_binary_log_loss(labels, p_second):
    """Kaggle's formula written out: -mean(y ln p + (1 - y) ln(1 - p)), y = 1 for the second class."""
    total = 0.0
    for y, p in zip(labels, p_second):
        p = min(max(p, 1e-15), 1 - 1e-15)
        total += y * math.log(p) + (1 - y) * math.log(1 - p)
    return -total / len(labels)


@pytest.mark.parametrize("classes", [CLASSES, ("no", "yes")])
def test_two_classes_keep_kaggles_binary_log_loss_and_order(classes):
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    # the first two do not sum to 1 (as float32 softmax outputs need not): only the second class's p counts
    probs = [[0.5, 0.3], [0.4, 0.45], [0.2, 0.8], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0], [0.35, 0.65], [0.6, 0.4]]
    m = compute_metrics(labels, probs, classes, paths=list("abcdefgh"))
    p_second = [p[1] for p in probs]
    assert m["log_loss"] == log_loss(labels, p_second, 1)  # today's function, bit for bit
    assert m["log_loss"] == pytest.approx(kaggle_binary_log_loss(labels, p_second), rel=1e-12)
    assert m["log_loss"] != pytest.approx(-sum(math.log(max(p[t], 1e-15)) for t, p in zip(labels, probs)) / 8)
    # the mistakes in today's order: farthest p(second) from the truth first
    wrong = [(path, t, p) for path, t, p in zip("abcdefgh", labels, probs) if t != (p[1] > p[0])]
    wrong.sort(key=lambda w: -abs(w[1] - w[2][1]))
    assert [w["path"] for w in m["worst_mistakes"]] == [path for path, _, _ in wrong] == ["d", "c", "g", "h"]
    first = m["worst_mistakes"][0]  # d: the second class at p .1
    assert (first["true"], first["p_true"], first["p_predicted"]) == (classes[1], 0.1, 0.9)
    if "dog" in classes:  # cat/dog reports keep their p(dog)
        assert list(first) == ["path", "true", "predicted", "p_dog", "p_true", "p_predicted"]
        assert first["p_dog"] == 0.1
    else:
        assert "p_dog" not in first


def test_the_data_classes_map_to_the_models_by_name():
    assert class_mapping(("cat", "dog"), ("cat", "dog")) == [0, 1]
    assert class_mapping(("cat", "dog"), ("dog", "cat")) == [1, 0]
    assert class_mapping(("apple", "cherry"), FRUIT) == [APPLE, CHERRY]  # the model may know more classes
    # a folder of apples and cherries scored by the fruit model: the figures are over the model's 3 classes
    to_model = class_mapping(("apple", "cherry"), FRUIT)
    m = compute_metrics([to_model[label] for label in (0, 1, 1)],
                        [[0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]], FRUIT)
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert m["per_class"]["banana"] == dict(precision=0.0, recall=None, support=0)
    with pytest.raises(DataError) as error:
        class_mapping(("apple", "durian", "fig"), FRUIT)
    message = str(error.value)
    assert "\n" not in message and "durian, fig" in message
    assert str(list(FRUIT)) in message and str(["apple", "durian", "fig"]) in message


def fruit_report(classes, worst):
    """A report of len(classes) classes with the fixture images as its mistakes (one path that is no image)."""
    k, images = len(classes), sorted(os.listdir(TRAIN_DIR))
    labels, probs, paths = [], [], []
    for i in range(20 * k):
        t, p = i % k, (i * 7 // 3) % k
        row = [0.2 / k] * k
        row[p] += 0.8
        labels.append(t), probs.append(row), paths.append(os.path.join(TRAIN_DIR, images[i % len(images)]))
    paths[1] = "missing.jpg"
    m = compute_metrics(labels, probs, classes, paths, worst)
    return dict(m, conv_net="base_cnn", model_path="m.pth", img_size=32, data_dir="data/fruit", split="val",
                skipped=[])


def test_the_text_report_of_three_classes_names_them():
    report = fruit_report(FRUIT, worst=4)
    text = evaluate_main.format_report(report)
    assert "p(dog)" not in text and "  p(true)  true    predicted  path" in text
    assert "images     data/fruit [val split]: 60 (apple 20, banana 20, cherry 20)" in text
    assert " " * 9 + "apple".rjust(9) + "banana".rjust(9) + "cherry".rjust(9) in text  # the matrix's header
    lines = text.splitlines()
    listed = lines[lines.index("  p(true)  true    predicted  path") + 1:]
    assert [line.split() for line in listed] == [["%.4f" % w["p_true"], w["true"], w["predicted"], w["path"]]
                                                 for w in report["worst_mistakes"]]
    assert len(report["worst_mistakes"]) == 4 and text.count("data/fruit") == 1


@pytest.mark.parametrize("k, worst", [(3, 12), (12, 12), (3, 0)])
def test_the_figure_of_n_classes(tmp_path, k, worst):
    from PIL import Image
    classes = FRUIT if k == 3 else tuple("class_%02d" % i for i in range(k))
    png = tmp_path / "eval.png"
    evaluate_main.draw_report(fruit_report(classes, worst), str(png))
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 500 <= width <= 2500 and 400 <= height <= 1500  # 90 dpi: a figure of some 6 to 28 inches
    if k == 12:  # the matrix grows with its classes
        evaluate_main.draw_report(fruit_report(FRUIT, worst), str(tmp_path / "small.png"))
        with Image.open(tmp_path / "small.png") as small:
            assert small.size[0] < width


# ---- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return saved_model(tmp_path_factory.mktemp("model") / "model_base_cnn.pth")


def run_evaluate(tmp_path, *args):
    out = tmp_path / "eval.json"
    evaluate_main.main([*map(str, args), "--json", str(out), "--num_workers", "0"])
    return json.loads(out.read_text())


def test_both_layouts_give_the_same_figures(tmp_path, random_model, flat_data, folder_data, capsys):
    flat = run_evaluate(tmp_path, "--model_path", random_model, "--data_dir", flat_data)
    folders = run_evaluate(tmp_path, "--model_path", random_model, "--data_dir", folder_data)
    assert flat["images"] == folders["images"] == 24
    for key in ("accuracy", "confusion_matrix", "mistakes"):
        assert flat[key] == folders[key]
    assert flat["log_loss"] == pytest.approx(folders["log_loss"], abs=1e-6)
    assert sum(map(sum, flat["confusion_matrix"])) == 24
    out = capsys.readouterr().out
    assert "accuracy   %.4f" % flat["accuracy"] in out and "confusion matrix" in out


def test_json_report_png_and_a_corrupt_file(tmp_path, random_model, flat_data, capsys):
    (flat_data / "cat.99.jpg").write_bytes(b"not a JPEG")
    png = tmp_path / "report" / "eval.png"
    report = run_evaluate(tmp_path, "--model_path", random_model, "--data_dir", flat_data, "--report", png,
                          "--worst", 5)
    assert report["images"] == 24 and report["skipped"] == [str(flat_data / "cat.99.jpg")]
    assert report["img_size"] == 32 and report["conv_net"] == "base_cnn" and report["classes"] == ["cat", "dog"]
    assert 0 <= report["accuracy"] <= 1 and report["log_loss"] > 0
    worst = report["worst_mistakes"]
    assert len(worst) == min(5, report["mistakes"])
    assert all(w["true"] != w["predicted"] and os.path.exists(w["path"]) for w in worst)
    errors = [abs((w["true"] == "dog") - w["p_dog"]) for w in worst]
    assert errors == sorted(errors, reverse=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cat.99.jpg" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained by train_main.py with half of the fixture images held out."""
    path = tmp_path_factory.mktemp("trained") / "model.pth"
    train_main.main(["--conv_net", "base_cnn", "--data_dir", TRAIN_DIR, "--model_path", str(path),
                     "--epochs", "1", "--img_size", "32", "--batch_size", "8", "--validation_split", "0.5",
                     "--seed", "3", "--num_workers", "0"])
    return str(path), json.loads(path.with_suffix(".json").read_text())


def moved_model(tmp_path, trained):
    """The trained model as another machine sees it: the folder its training recorded is not there."""
    path, meta = trained
    moved = json.loads(json.dumps(meta))
    moved["args"]["data_dir"] = str(tmp_path / "gone")
    model = tmp_path / "moved.pth"
    shutil.copy(path, model)
    model.with_suffix(".json").write_text(json.dumps(moved))
    return str(model)


def test_validation_split_falls_back_to_the_readme_folder(tmp_path, trained, monkeypatch, capsys):
    """Training's recorded folder is gone (another machine): data/train, where the README puts the images.
    It holds the very files training split (the JSON's fingerprint says so): nothing to warn about."""
    model = moved_model(tmp_path, trained)
    shutil.copytree(TRAIN_DIR, tmp_path / "data" / "train")
    monkeypatch.chdir(tmp_path)
    report = run_evaluate(tmp_path, "--model_path", model, "--split", "val")
    assert report["data_dir"] == os.path.join("data", "train")
    assert report["images"] == 12 and report["accuracy"] == trained[1]["val_acc"]  # same files, same split
    assert "warning" not in capsys.readouterr().err


def test_a_folder_with_other_files_is_named_in_a_warning(tmp_path, trained, monkeypatch, capsys):
    """data/train holds one image more than training's folder did (Kaggle's 25,000 against the shipped
    models' 12,000, say): the re-created split is not training's, and the warning says so with the counts."""
    model = moved_model(tmp_path, trained)
    shutil.copytree(TRAIN_DIR, tmp_path / "data" / "train")
    shutil.copy(os.path.join(TRAIN_DIR, "cat.0.jpg"), tmp_path / "data" / "train" / "cat.999.jpg")
    monkeypatch.chdir(tmp_path)
    run_evaluate(tmp_path, "--model_path", model, "--split", "val")
    err = capsys.readouterr().err
    assert "warning: data/train holds 25 labeled images, not the 24 the checkpoint's split was made from" in err


def test_a_checkpoint_without_a_fingerprint_warns_only_in_a_folder_it_did_not_name(tmp_path, trained, monkeypatch,
                                                                                    capsys):
    path, meta = trained
    older = json.loads(json.dumps(meta))
    del older["data"]  # as checkpoints written before training recorded it
    shutil.copy(path, tmp_path / "older.pth")
    (tmp_path / "older.json").write_text(json.dumps(older))
    run_evaluate(tmp_path, "--model_path", str(tmp_path / "older.pth"), "--split", "val")  # its own folder
    assert "warning" not in capsys.readouterr().err
    older["args"]["data_dir"] = str(tmp_path / "gone")
    (tmp_path / "older.json").write_text(json.dumps(older))
    shutil.copytree(TRAIN_DIR, tmp_path / "data" / "train")
    monkeypatch.chdir(tmp_path)
    run_evaluate(tmp_path, "--model_path", str(tmp_path / "older.pth"), "--split", "val")
    assert "does not record which files its split was made from" in capsys.readouterr().err


def test_the_shipped_models_record_their_images_in_terms_a_user_can_act_on():
    """The shipped models trained on a 12,000-image subset of Kaggle's train.zip, in a folder of the machine
    that trained them: their JSON names the subset, and models/training_images.txt lists its files, which
    is what the fingerprint is computed from."""
    from models import MODELS, weights_path
    from models.checkpoint import read_meta
    with open(os.path.join(REPO_ROOT, "models", "training_images.txt")) as f:
        listed = f.read().split()
    samples = [(os.path.join(REPO_ROOT, name), CLASSES.index(name.split(".")[0])) for name in sorted(listed)]
    expected = data_fingerprint(REPO_ROOT, samples)
    shipped = [os.path.join(REPO_ROOT, weights_path(name)) for name in MODELS]
    shipped = [path for path in shipped if os.path.isfile(path)]
    shipped.append(os.path.join(REPO_ROOT, "models/efficientnet_lite1/validated/model_efficientnet_lite1.pth"))
    assert len(shipped) == 3
    for path in shipped:
        data = read_meta(path)["data"]
        assert (data["images"], data["sha256"]) == (expected["images"], expected["sha256"]) == (12000, data["sha256"])
        assert "models/training_images.txt" in data["source"] and "train.zip" in data["source"]


def test_validation_split_without_any_folder_is_one_line(tmp_path, trained, capsys, monkeypatch):
    model = moved_model(tmp_path, trained)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main.main(["--model_path", model, "--split", "val"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "is not here, nor is data/train: pass --data_dir" in lines[0]


def test_the_validation_split_of_the_shipped_final_fit_names_the_run_to_score_instead(capsys):
    """The shipped EfficientNet trained on every image and carried no calibration: --split val on it is one
    line naming the run that validated its recipe, which ships beside it in validated/."""
    from models import shipped_models, weights_path
    conv_net = [name for name in shipped_models() if name.startswith("efficientnet")][0]
    path = weights_path(conv_net)
    validated = os.path.join(os.path.dirname(path), "validated", os.path.basename(path))
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main.main(["--conv_net", conv_net, "--split", "val", "--data_dir", TRAIN_DIR])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert lines == ["error: training held out no validation images (--validation_split 0); its recipe was "
                     "validated by %s: score that with --model_path %s --split val" % (validated, validated)]


def test_validation_split_reproduces_trainings_accuracy(tmp_path, trained):
    path, meta = trained
    report = run_evaluate(tmp_path, "--model_path", path, "--split", "val")
    _, val = stratified_split(find_labeled_images(TRAIN_DIR)[1], 0.5, 3)
    assert report["images"] == len(val) == 12 and report["data_dir"] == TRAIN_DIR
    assert report["img_size"] == 32  # from the meta JSON, no flag
    assert report["accuracy"] == meta["val_acc"]
    assert report["log_loss"] == pytest.approx(meta["val_loss"], abs=1e-5)
    assert report["training"] == dict(epoch=1, val_acc=meta["val_acc"], val_loss=meta["val_loss"])
    assert training_split(meta, "val")[2] == val


def test_train_split_is_the_rest(tmp_path, trained):
    path, _ = trained
    report = run_evaluate(tmp_path, "--model_path", path, "--split", "train")
    assert report["images"] == 12 and "training" not in report


@pytest.mark.parametrize("args, message", [
    ([], "--data_dir is required"),
    (["--data_dir", "missing"], "data folder not found"),
    (["--split", "val"], "does not record training's split"),
    (["--data_dir", "EMPTY"], "no images"),
    (["--data_dir", TRAIN_DIR, "--conv_net", "efficientnet_lite0"], "base_cnn"),
    (["--data_dir", TRAIN_DIR, "--split", "test"], "--split"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, random_model, capsys, monkeypatch, args, message):
    (tmp_path / "EMPTY").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main.main(["--model_path", random_model, *args])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]

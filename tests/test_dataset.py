import errno
import os
import shutil

import pytest
import torch

from dataset import (DataError, balance_warning, decode_images, dry_run_subset, find_images, find_labeled_images,
                     stratified_split, training_samples)
from tests.serving_utils import eps_bytes
from tests.support import TRAIN_DIR
from tests.helpers_training import one_thread  # noqa: F401  (autouse: torch on one thread)
import train_main


def test_flat_layout_labels_come_from_file_names(flat_data):
    _, samples = find_labeled_images(str(flat_data))
    assert len(samples) == 24
    assert all((os.path.basename(p).startswith("dog")) == (label == 1) for p, label in samples)


def test_folder_layout_labels_come_from_sub_folders(folder_data):
    _, samples = find_labeled_images(str(folder_data))
    assert len(samples) == 24
    assert {label for p, label in samples if os.sep + "dog" + os.sep in p} == {1}
    assert {label for p, label in samples if os.sep + "cat" + os.sep in p} == {0}


def test_split_is_stratified_seeded_and_disjoint(flat_data):
    _, samples = find_labeled_images(str(flat_data))
    train, val = stratified_split(samples, 0.25, seed=3)
    assert sorted(train + val) == sorted(samples)
    assert not set(train) & set(val)
    assert [label for _, label in val].count(0) == [label for _, label in val].count(1) == 3
    assert (train, val) == stratified_split(samples, 0.25, seed=3)
    assert val != stratified_split(samples, 0.25, seed=4)[1]


@pytest.mark.parametrize("split", [-0.1, 1.0, 1.5])
def test_split_outside_unit_interval_is_refused(flat_data, split):
    with pytest.raises(DataError, match="validation_split"):
        stratified_split(find_labeled_images(str(flat_data))[1], split, 0)


def test_missing_empty_and_one_class_folders_are_errors(tmp_path, flat_data):
    with pytest.raises(DataError, match="not found"):
        find_labeled_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        find_labeled_images(str(tmp_path / "empty"))
    for f in flat_data.glob("dog.*"):
        f.unlink()
    with pytest.raises(DataError, match=r"one class \(cat\)"):
        find_labeled_images(str(flat_data))


def test_corrupt_image_is_named_and_skipped(flat_data, capsys):
    (flat_data / "cat.999.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _, samples = find_labeled_images(str(flat_data))
    images, labels, kept = decode_images(samples, 32)
    assert images.shape == (24, 3, 32, 32) and images.dtype == torch.uint8
    assert len(kept) == len(labels) == 24
    assert capsys.readouterr().err.count("cat.999.jpg") == 1


def test_broken_and_looping_links_are_named_and_skipped(flat_data, capsys):
    """Issue 17: dangling and looping *.jpg links were dropped without a word."""
    os.symlink(str(flat_data / "gone.jpg"), str(flat_data / "cat.900.jpg"))  # its target does not exist
    os.symlink("dog.901.jpg", str(flat_data / "dog.900.jpg"))  # two links pointing at each other
    os.symlink("dog.900.jpg", str(flat_data / "dog.901.jpg"))
    (flat_data / "cat.902.jpg").mkdir()  # a folder named like an image is no image: not listed
    _, samples = find_labeled_images(str(flat_data))
    assert len(samples) == 27
    assert str(flat_data / "cat.900.jpg") in find_images(str(flat_data))  # prediction's listing too
    images, labels, kept = decode_images(samples, 32)
    assert len(kept) == len(labels) == 24
    err = capsys.readouterr().err
    for name in ("cat.900.jpg", "dog.900.jpg", "dog.901.jpg"):
        assert err.count("warning: skipping %s: cannot read file: " % (flat_data / name)) == 1, err
    assert "%s (a symbolic link to %s)" % (os.strerror(errno.ENOENT), flat_data / "gone.jpg") in err
    assert "%s (a symbolic link to dog.901.jpg)" % os.strerror(errno.ELOOP) in err
    assert "cat.902.jpg" not in err


def test_eps_named_jpg_is_skipped_without_reaching_its_plugin(flat_data, capsys, eps_plugin_calls):
    """Training decodes only the accepted formats, as serving does: never Pillow's EPS plugin (Ghostscript)."""
    (flat_data / "cat.998.jpg").write_bytes(eps_bytes())
    images, labels, kept = decode_images(find_labeled_images(str(flat_data))[1], 32)
    assert len(kept) == 24 and eps_plugin_calls == []
    assert "skipping %s: unsupported image format" % (flat_data / "cat.998.jpg") in capsys.readouterr().err


def test_unlabeled_folder_sorts_numeric_ids_numerically(tmp_path):
    for stem in ["10", "2", "1", "abc"]:
        (tmp_path / (stem + ".jpg")).write_bytes(b"x")
    assert [os.path.basename(p) for p in find_images(str(tmp_path))] == ["1.jpg", "2.jpg", "10.jpg", "abc.jpg"]


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--data_dir", d / "empty"], "no images"),
    (lambda d: ["--data_dir", d / "missing"], "not found"),
    (lambda d: ["--data_dir", d / "flat", "--validation_split", "1.2"], "validation_split"),
])
def test_train_main_bad_data_exits_2_with_one_line(tmp_path, flat_data, capsys, make_args, message):
    """train_main.main in this process (test_training.py's test_unwritable_model_path_exits_2_before_decoding
    runs a real process for its exit status and one line)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        train_main.main([*map(str, make_args(tmp_path)), "--model_path", str(tmp_path / "m.pth"), "--dry-run"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "m.pth").exists()


def test_train_main_skips_corrupt_file_and_names_it(tmp_path, flat_data, capsys):
    (flat_data / "dog.999.jpg").write_bytes(b"GIF89a truncated")
    # Two epochs, not base_cnn's 16: the second shows the file is named once, when decoded, not each epoch.
    # base_cnn's --batch_size (64) keeps every file, dog.999.jpg included, in the dry run's few batches.
    train_main.main(["--data_dir", str(flat_data), "--model_path", str(tmp_path / "m.pth"), "--img_size", "32",
                     "--epochs", "2", "--dry-run", "--num_workers", "0"])
    assert capsys.readouterr().err.count("dog.999.jpg") == 1
    assert (tmp_path / "m.pth").exists()


def test_training_samples_are_the_seeded_split_and_a_dry_run_takes_a_few_of_both_classes(flat_data):
    """The one definition of which images a run uses: training and evaluate_main.py --split val/train call it."""
    train, val = training_samples(str(flat_data), 0.25, seed=0)
    assert (train, val) == stratified_split(find_labeled_images(str(flat_data))[1], 0.25, seed=0)
    small_train, small_val = training_samples(str(flat_data), 0.25, seed=0, dry_run=True, batch_size=3)
    assert len(small_train) == 6 and len(small_val) == 3  # 2 training batches, 1 validation batch
    for part, whole in ((small_train, train), (small_val, val)):
        assert {label for _, label in part} == {0, 1}  # sorted files start with every cat
        assert set(part) <= set(whole)
    assert training_samples(str(flat_data), 0.25, 0, True, 3) == (small_train, small_val)  # the same every time


# ---- classes from the data ----------------------------------------------------------------------

def test_classes_come_from_the_folder_names_sorted(tmp_path):

    photo = os.path.join(TRAIN_DIR, "cat.0.jpg")
    for name, count in (("zebra", 2), ("Apple", 1), ("mango tree", 3)):
        (tmp_path / name).mkdir()
        for i in range(count):
            shutil.copy(photo, str(tmp_path / name / ("%d.jpg" % i)))
    classes, samples = find_labeled_images(str(tmp_path))
    assert classes == ("Apple", "mango tree", "zebra")  # sorted as ImageFolder sorts them
    assert [classes[label] for _, label in samples] == ["Apple"] + ["mango tree"] * 3 + ["zebra"] * 2


def test_the_flat_layout_takes_any_prefix_and_the_kaggle_one_is_unchanged(flat_data):

    classes, samples = find_labeled_images(str(flat_data))
    assert classes == ("cat", "dog") and len(samples) == 24
    shutil.copy(str(flat_data / "cat.0.jpg"), str(flat_data / "fox.1.jpg"))
    shutil.copy(str(flat_data / "cat.0.jpg"), str(flat_data / "IMG_1.jpg"))  # not CLASS.N.jpg: not labeled
    classes, samples = find_labeled_images(str(flat_data))
    assert classes == ("cat", "dog", "fox") and len(samples) == 25


def test_dry_run_takes_every_class_even_more_than_its_batches(tmp_path):

    samples = [("%02d.jpg" % i, i % 7) for i in range(70)]
    train, val = dry_run_subset(samples, samples, batch_size=2)  # 2 batches of 2 < 7 classes
    assert {label for _, label in train} == set(range(7)) and {label for _, label in val} == set(range(7))


def test_balance_warning_names_the_classes_with_few_images():

    classes = ("apple", "banana", "cherry")
    samples = [("a", 0)] * 50 + [("b", 1)] * 40 + [("c", 2)] * 3
    assert "class cherry has fewer than 10 training images (cherry 3)" in balance_warning(classes, samples)
    assert balance_warning(classes, [("a", 0)] * 50 + [("b", 1)] * 40 + [("c", 2)] * 45) is None
    assert "unbalanced (apple 100, banana 40, cherry 12)" in balance_warning(
        classes, [("a", 0)] * 100 + [("b", 1)] * 40 + [("c", 2)] * 12)

"""Dogs-vs-Cats images on disk -> labeled, split, decoded-once tensors.

Two layouts are detected automatically:
  flat (Kaggle):  root/cat.0.jpg, root/dog.12.jpg      the label is the file-name prefix
  ImageFolder:    root/cat/xxx.jpg, root/dog/yyy.jpg   the label is the sub-folder

Training decodes every JPEG once, resized to the training size, into one uint8
tensor; epochs then only crop/flip in memory. On a 2-core CPU, JPEG decoding
would otherwise cost as much as the model's forward pass.
"""
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from models import CLASSES
from models.transforms import decode_file, is_image_file, resize, to_uint8_tensor


class DataError(ValueError):
    """The data folder cannot be used for training; the message says why."""


def _is_broken_link(path):
    """A symbolic link whose target is missing or loops back: not a file, but not to be dropped silently."""
    return os.path.islink(path) and not os.path.exists(path)


def _image_files(folder):
    """Image file names of `folder`. Broken links are kept, so that decoding names them on stderr
    like any unreadable file instead of dropping them unseen; sub-folders (even x.jpg/) are not images."""
    def wanted(name):
        path = os.path.join(folder, name)
        return is_image_file(name) and (os.path.isfile(path) or _is_broken_link(path))
    return sorted(filter(wanted, os.listdir(folder)))


def detect_layout(root, classes=CLASSES):
    """'folders' when root has a sub-folder per class, else 'flat'."""
    if not os.path.isdir(root):
        raise DataError("data folder not found: %s" % root)
    subdirs = [c for c in classes if os.path.isdir(os.path.join(root, c))]
    return "folders" if subdirs else "flat"


def find_labeled_images(root, classes=CLASSES):
    """[(path, label index)] for every image of `root`, in either layout, sorted by path.

    Raises DataError for a missing or empty folder or a class with no images.
    """
    layout = detect_layout(root, classes)
    samples = []
    if layout == "folders":
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            files = _image_files(folder) if os.path.isdir(folder) else []
            if not files:
                raise DataError("no images of class '%s' in %s" % (name, folder))
            samples += [(os.path.join(folder, f), label) for f in files]
        return samples
    files = _image_files(root)
    if not files:
        raise DataError("no images in %s (expected cat.N.jpg / dog.N.jpg files, or cat/ and dog/ folders)" % root)
    prefix_to_label = {name: i for i, name in enumerate(classes)}
    for f in files:
        label = prefix_to_label.get(f.split(".")[0].lower())
        if label is not None:
            samples.append((os.path.join(root, f), label))
    for label, name in enumerate(classes):
        if not any(lab == label for _, lab in samples):
            raise DataError("no images of class '%s' in %s (expected files named %s.N.jpg)" % (name, root, name))
    return samples


def data_fingerprint(root, samples=None):
    """What a split is made from: how many labeled images `root` holds and the SHA-256 of their names
    (relative to `root`) and labels, in order. Training records it in the meta JSON; evaluation
    compares it with a folder's own, to tell whether re-creating the split there gives the same images."""
    import hashlib
    samples = find_labeled_images(root) if samples is None else samples
    digest = hashlib.sha256()
    for path, label in samples:
        digest.update(("%s\t%d\n" % (os.path.relpath(path, root).replace(os.sep, "/"), label)).encode())
    return {"images": len(samples), "sha256": digest.hexdigest()}


def numeric_stem_key(path):
    """Sort key: numeric file stems numerically (2 < 10), the rest alphabetically after them."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def find_images(root):
    """Every image file of `root` (unlabeled, e.g. Kaggle's test1/), numeric ids in numeric order."""
    if not os.path.isdir(root):
        raise DataError("image folder not found: %s" % root)
    files = [os.path.join(root, f) for f in _image_files(root)]
    if not files:
        raise DataError("no images in %s" % root)
    return sorted(files, key=numeric_stem_key)


def stratified_split(samples, validation_split, seed):
    """Seeded split that keeps the class ratio in both parts. Returns (train, val)."""
    if not 0 <= validation_split < 1:
        raise DataError("--validation_split must be in [0, 1), got %g" % validation_split)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({lab for _, lab in samples}):
        group = [s for s in samples if s[1] == label]
        rng.shuffle(group)
        n_val = round(len(group) * validation_split)
        if validation_split > 0 and len(group) > 1:
            n_val = min(max(n_val, 1), len(group) - 1)  # both parts keep every class
        val += group[:n_val]
        train += group[n_val:]
    return sorted(train), sorted(val)


def training_samples(data_dir, validation_split, seed, dry_run=False, batch_size=None, samples=None):
    """The (train, val) samples a training run with these flags uses: the seeded, stratified split of
    `data_dir`, cut down to a few batches by --dry-run. Training calls this, and so does evaluation
    with the flags a checkpoint's JSON recorded, so `evaluate_main.py --split val` scores exactly
    the images training held out, a dry run's included. samples: find_labeled_images(data_dir), when
    the caller has listed the folder already."""
    samples = find_labeled_images(data_dir) if samples is None else samples
    train, val = stratified_split(samples, validation_split, seed)
    return dry_run_subset(train, val, batch_size) if dry_run else (train, val)


# --dry-run: how many batches of images each part keeps. Training then runs 2 steps per epoch
# (fewer per process under torchrun: the ranks share them) and validates one batch.
DRY_RUN_BATCHES = {"train": 2, "val": 1}


def dry_run_subset(train, val, batch_size):
    """The few images a --dry-run uses: the first of each class in turn, so both classes are
    seen (the first files of a sorted folder are all cats)."""
    def head(samples, n):
        by_class = {}
        for sample in samples:
            by_class.setdefault(sample[1], []).append(sample)
        queues = [by_class[label] for label in sorted(by_class)]
        picked = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
        return sorted(picked[:n])
    return (head(train, DRY_RUN_BATCHES["train"] * batch_size),
            head(val, DRY_RUN_BATCHES["val"] * batch_size))


def _decode_one(args):
    path, img_size = args
    return decode_file(path, img_size, lambda img: to_uint8_tensor(resize(img, img_size)).numpy())


def decode_images(samples, img_size, num_workers=0, desc="decoding"):
    """Decode and resize every image once. Undecodable files are named on stderr and skipped.

    Returns (uint8 tensor N x 3 x S x S, label tensor N, kept samples).
    """
    jobs = [(path, img_size) for path, _ in samples]
    bar = dict(total=len(jobs), desc=desc, unit="img", leave=False, mininterval=1.0)
    if num_workers > 0:
        # Threads, not processes: Pillow's decoding and resizing release the GIL, so they run in
        # parallel all the same, and nothing is forked. A forked child of a process whose torch
        # already ran its OpenMP thread pool (the model is built before decoding) can deadlock in
        # its first torch operation; threads also need no /dev/shm.
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            results = list(tqdm(pool.map(_decode_one, jobs), **bar))
    else:
        results = [_decode_one(job) for job in tqdm(jobs, **bar)]
    images, kept = [], []
    for (path, label), (array, error) in zip(samples, results):
        if array is None:
            print("warning: skipping %s: %s" % (path, error), file=sys.stderr)
            continue
        images.append(torch.from_numpy(array))
        kept.append((path, label))
    if not images:
        raise DataError("none of the %d images could be decoded" % len(samples))
    labels = torch.tensor([label for _, label in kept])
    return torch.stack(images), labels, kept


class DecodedImages(Dataset):
    """Decoded uint8 images with an optional augmentation; yields (uint8 CHW, label).

    Normalization happens per batch in the trainer, with models.transforms.normalize,
    so evaluation sees exactly what eval_transform gives a single image.
    """

    def __init__(self, images, labels, augment=None):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        return (self.augment(img) if self.augment else img), self.labels[i]

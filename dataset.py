"""Labeled images on disk -> classes, labeled, split, decoded-once tensors.

Two layouts are detected automatically; the classes come from the data (find_labeled_images):
  ImageFolder:    root/apple/x.jpg, root/banana/y.png ...   the class is the sub-folder (any names, 2 or more)
  flat (Kaggle):  root/cat.0.jpg, root/dog.12.jpg           the class is the file name's first part

Training decodes every JPEG once, resized to the training size, into one uint8
tensor; epochs then only crop/flip in memory. On a 2-core CPU, JPEG decoding
would otherwise cost as much as the model's forward pass.
"""
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from models.transforms import IMAGE_EXTENSIONS, decode_file, is_image_file, resize, to_uint8_tensor


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


# What a class may be called: a label that travels unchanged through a CSV header, the ONNX export's
# metadata (comma-separated), index_to_name.json and a JSON answer. Letters (any script), digits, and
# " ", "_", "-", "+", "." inside; at most 100 characters.
_LABEL = re.compile(r"[^\W_](?:[\w .+-]{0,98}[\w+.-])?\Z")
# Folders that are never classes: editors', notebooks' and archivers' own (.ipynb_checkpoints, __MACOSX).
_NOT_CLASSES = ("__MACOSX",)


def check_label(name, where):
    """Refuse a class name that is not a valid label (see _LABEL), naming `where` it came from."""
    if not _LABEL.match(name):
        raise DataError("%r in %s is not a valid class name: use letters, digits and ' _-+.' (not first or last), "
                        "at most 100 characters" % (name, where))
    return name


def _class_folders(root):
    """The sub-folders of `root` that are classes: not hidden, not an archiver's, not named like an image (a
    folder x.jpg, or a link to one, is a misplaced file, which _image_files names, not a class)."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                  and not d.startswith(".") and d not in _NOT_CLASSES and not is_image_file(d))


def _flat_label(name):
    """The class of a flat-layout file: Kaggle names them CLASS.N.jpg; None for a file not named so."""
    parts = name.split(".")
    return parts[0].lower() if len(parts) >= 3 and parts[0] else None


def find_labeled_images(root):
    """(classes, samples) of `root`: the class names, sorted, and [(path, index into classes)] for every
    image, sorted by path. The classes come from the data, as in torchvision's ImageFolder:

      folders (ImageFolder): one sub-folder per class, any names, e.g. root/apple/x.jpg, root/cherry/y.png;
      flat (Kaggle):         root/cat.0.jpg, root/dog.12.jpg: the class is the name's first part.

    Raises DataError, one line saying what to fix, for: a missing or empty folder, fewer than two classes,
    a class folder with no images, a class name that is not a valid label (check_label), images beside
    class folders (a mixed layout)."""
    if not os.path.isdir(root):
        raise DataError("data folder not found: %s" % root)
    folders = _class_folders(root)  # any: the folders layout; none: the flat one
    samples = []
    if folders:
        classes = tuple(check_label(c, root) for c in folders)
        loose = _image_files(root)
        if loose:
            raise DataError("%s mixes class folders (%s) with %d image(s) beside them (%s, ...): put every image "
                            "in its class's folder" % (root, ", ".join(classes[:5]), len(loose), loose[0]))
        if len(classes) < 2:
            raise DataError("%s has one class folder (%s): a classifier needs at least two classes, one "
                            "sub-folder each" % (root, classes[0]))
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            files = _image_files(folder)
            if not files:
                raise DataError("no images of class '%s' in %s (every class folder needs images; accepted: %s)"
                                % (name, folder, " ".join(IMAGE_EXTENSIONS)))
            samples += [(os.path.join(folder, f), label) for f in files]
        return classes, samples
    files = _image_files(root)
    if not files:
        raise DataError("no images in %s (expected one sub-folder of images per class, or Kaggle's cat.N.jpg / "
                        "dog.N.jpg files)" % root)
    labeled = [(f, _flat_label(f)) for f in files]
    classes = tuple(sorted({check_label(label, os.path.join(root, f)) for f, label in labeled if label}))
    if len(classes) < 2:
        raise DataError("%s has images of %s: a classifier needs at least two classes (one sub-folder each, or "
                        "files named CLASS.N.jpg as Kaggle's cat.0.jpg, dog.0.jpg)"
                        % (root, "one class (%s)" % classes[0] if classes else "no class (no file named CLASS.N.jpg)"))
    index = {name: i for i, name in enumerate(classes)}
    return classes, [(os.path.join(root, f), index[label]) for f, label in labeled if label]


def class_counts(classes, samples):
    """{class name: number of samples}, every class included."""
    counts = dict.fromkeys(classes, 0)
    for _, label in samples:
        counts[classes[label]] += 1
    return counts


# A class with fewer images than this in the training part is named in a warning: too few to learn it.
FEW_IMAGES = 10


def balance_warning(classes, samples):
    """One line naming the classes with very few images, or the imbalance when it is large; None when fine."""
    counts = class_counts(classes, samples)
    few = [name for name, n in counts.items() if n < FEW_IMAGES]
    if few:
        return ("class%s %s ha%s fewer than %d training images (%s): expect %s to be poorly recognised"
                % ("es" if len(few) > 1 else "", ", ".join(few), "ve" if len(few) > 1 else "s", FEW_IMAGES,
                   ", ".join("%s %d" % (c, counts[c]) for c in few), "them" if len(few) > 1 else "it"))
    largest, smallest = max(counts.values()), min(counts.values())
    if smallest and largest >= 5 * smallest:
        return ("the classes are unbalanced (%s): accuracy favours the largest; per-class recall "
                "(evaluate_main.py) tells more" % ", ".join("%s %d" % kv for kv in counts.items()))
    return None


def data_fingerprint(root, samples=None):
    """What a split is made from: how many labeled images `root` holds and the SHA-256 of their names
    (relative to `root`) and labels, in order. Training records it in the meta JSON; evaluation
    compares it with a folder's own, to tell whether re-creating the split there gives the same images."""
    import hashlib
    samples = find_labeled_images(root)[1] if samples is None else samples
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
    the caller has listed the folder already (its samples)."""
    samples = find_labeled_images(data_dir)[1] if samples is None else samples
    train, val = stratified_split(samples, validation_split, seed)
    return dry_run_subset(train, val, batch_size) if dry_run else (train, val)


# --dry-run: how many batches of images each part keeps. Training then runs 2 steps per epoch
# (fewer per process under torchrun: the ranks share them) and validates one batch.
DRY_RUN_BATCHES = {"train": 2, "val": 1}


def dry_run_subset(train, val, batch_size):
    """The few images a --dry-run uses: the first of each class in turn, so every class is seen (the
    first files of a sorted folder are all of one class), and at least one of each however many there are."""
    def head(samples, n):
        by_class = {}
        for sample in samples:
            by_class.setdefault(sample[1], []).append(sample)
        queues = [by_class[label] for label in sorted(by_class)]
        picked = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
        return sorted(picked[:max(n, len(queues))])
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

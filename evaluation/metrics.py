"""Scoring a classifier on labeled images: Kaggle's log loss, accuracy, the confusion matrix, per-class
precision and recall, the most confidently wrong images; and which images training held out.

evaluate_main.py is the command line around it; training's own validation uses train.py's loss.
"""
import math
import os
import sys

from dataset import DataError, data_fingerprint, find_labeled_images, training_samples
from models import CLASSES
from parsers import DEFAULT_DATA_DIR

LOG_LOSS_EPS = 1e-15


def log_loss(labels, p_dog, dog_index=1):
    """Kaggle's binary log loss: -mean(y log p + (1 - y) log(1 - p)), p clipped to [eps, 1 - eps]."""
    total = 0.0
    for label, p in zip(labels, p_dog):
        p = min(max(float(p), LOG_LOSS_EPS), 1 - LOG_LOSS_EPS)
        total += -math.log(p) if label == dog_index else -math.log(1 - p)
    return total / len(labels)


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else None  # undefined, not 0: JSON null, '-' in the table


def compute_metrics(labels, p_dog, predicted=None, classes=CLASSES, paths=None, worst=12):
    """Every figure of the report, from true labels and the probability of dog of each image.

    labels, predicted: class indices into `classes` (predicted defaults to dog when p_dog > 0.5).
    confusion_matrix[t][p] counts images of true class t predicted as p.
    """
    if not labels:
        raise ValueError("no predictions to score")
    dog = classes.index("dog")
    if predicted is None:
        predicted = [dog if p > 0.5 else 1 - dog for p in p_dog]
    n, k = len(labels), len(classes)
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(labels, predicted):
        matrix[t][p] += 1
    per_class = {}
    for c, name in enumerate(classes):
        per_class[name] = dict(precision=_ratio(matrix[c][c], sum(matrix[t][c] for t in range(k))),
                               recall=_ratio(matrix[c][c], sum(matrix[c])), support=sum(matrix[c]))
    # Most confidently wrong: the mistakes whose probability of dog is farthest from the truth.
    paths = paths or [None] * n
    mistakes = [dict(path=path, true=classes[t], predicted=classes[p], p_dog=q)
                for path, t, p, q in zip(paths, labels, predicted, p_dog) if t != p]
    mistakes.sort(key=lambda m: -abs((1.0 if m["true"] == "dog" else 0.0) - m["p_dog"]))
    return dict(images=n, accuracy=sum(t == p for t, p in zip(labels, predicted)) / n,
                log_loss=log_loss(labels, p_dog, dog), classes=list(classes), confusion_matrix=matrix,
                per_class=per_class, mistakes=len(mistakes), worst_mistakes=mistakes[:worst])


# ---- which images ---------------------------------------------------------------------------


def training_split(meta, split, data_dir=None):
    """Re-create the (train, val) split of train_main.py from the arguments it stored in the meta JSON.

    Returns (data_dir, samples of `split`). Same folder, same validation_split and seed
    -> the very same images (a dry run's few images included): dataset.training_samples, as training.
    """
    args = meta.get("args") or {}
    if "validation_split" not in args or "seed" not in args:
        raise DataError("the checkpoint's JSON does not record training's split (args.validation_split, "
                        "args.seed); evaluate a labeled folder with --data_dir and --split all")
    picked = not data_dir
    if picked:
        # The folder training recorded is where *that* machine kept the images (the shipped models
        # say ../shared/...); on another machine the README puts them in data/train, train_main.py's
        # default. Training's own folder wins where it exists, so a model trained here is scored on
        # exactly its split.
        recorded = args.get("data_dir")
        candidates = [d for d in (recorded, DEFAULT_DATA_DIR) if d]
        data_dir = next((d for d in candidates if os.path.isdir(d)), None)
        if data_dir is None:
            raise DataError("training's data folder %s is not here, nor is %s: pass --data_dir%s"
                            % (recorded or "(not recorded)", DEFAULT_DATA_DIR, _source(meta)))
    samples = find_labeled_images(data_dir)  # listed once: for the fingerprint and for the split
    warning = split_warning(meta, data_dir, picked, samples)
    if warning:
        print("warning: " + warning, file=sys.stderr)
    train, val = training_samples(data_dir, args["validation_split"], args["seed"], args.get("dry_run"),
                                  args.get("batch_size"), samples)
    chosen = val if split == "val" else train
    if not chosen:
        validated = (meta.get("calibration") or {}).get("carried_from")
        raise DataError("training held out no validation images (--validation_split %g)%s" % (
            args["validation_split"], "; its recipe was validated by %s: score that with --model_path %s --split val"
            % (validated, validated) if validated else ""))
    return data_dir, chosen


def _source(meta):
    source = (meta.get("data") or {}).get("source")
    return " (training's images: %s)" % source if source else ""


def split_warning(meta, data_dir, picked=True, samples=None):
    """Why re-creating training's split from `data_dir` may not give training's images, or None when it does.

    The split is re-created from the file names, so it is training's own exactly when the folder holds
    the files training's did: the meta JSON's `data` fingerprint says which (dataset.data_fingerprint).
    A checkpoint without one is trusted in the folder it names, or in one the user chose (`picked` False)."""
    recorded = (meta.get("data") or {})
    if "sha256" not in recorded:
        if not picked or data_dir == (meta.get("args") or {}).get("data_dir"):
            return None
        return ("the checkpoint does not record which files its split was made from; re-creating it from %s "
                "gives training's images only if that folder holds the same files as training's %s"
                % (data_dir, (meta.get("args") or {}).get("data_dir")))
    here = data_fingerprint(data_dir, samples)
    if here["sha256"] == recorded["sha256"]:
        return None
    return ("%s holds %d labeled images, not the %d the checkpoint's split was made from%s: the re-created split is "
            "not training's, and some of its images were trained on, so the figures are optimistic"
            % (data_dir, here["images"], recorded.get("images", 0), _source(meta)))


def score_samples(predictor, samples, batch_size=32, num_workers=0, worst=12, desc="evaluating"):
    """Predict every (path, label) and score it; undecodable files are named on stderr and skipped."""
    results = predictor.predict_files([path for path, _ in samples], batch_size, num_workers, desc)
    kept = [(path, label, probs) for (path, label), (_, probs) in zip(samples, results) if probs is not None]
    if not kept:
        raise DataError("none of the %d images could be decoded" % len(samples))
    # dataset labels index models.CLASSES; the model's outputs index the classes it was trained with
    if not set(CLASSES) <= set(predictor.classes):
        raise DataError("the model's classes %s do not include %s" % (list(predictor.classes), list(CLASSES)))
    to_model = [predictor.classes.index(name) for name in CLASSES]
    labels = [to_model[label] for _, label, _ in kept]
    predicted = [max(range(len(probs)), key=probs.__getitem__) for _, _, probs in kept]  # argmax, as training
    p_dog = [probs[predictor.dog_index] for _, _, probs in kept]
    metrics = compute_metrics(labels, p_dog, predicted, predictor.classes, [p for p, _, _ in kept], worst)
    metrics["skipped"] = [path for (path, _), (_, probs) in zip(samples, results) if probs is None]
    return metrics

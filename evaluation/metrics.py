"""Scoring a classifier on labeled images: Kaggle's log loss, accuracy, the confusion matrix, per-class
precision and recall, the most confidently wrong images; and which images training held out.

evaluate_main.py is the command line around it; training's own validation uses train.py's loss.
"""
import math
import os
import sys

from dataset import DataError, data_fingerprint, find_labeled_images, training_samples
from parsers import DEFAULT_DATA_DIR

LOG_LOSS_EPS = 1e-15


def log_loss(labels, p_dog, dog_index=1):
    """Kaggle's binary log loss: -mean(y log p + (1 - y) log(1 - p)), p clipped to [eps, 1 - eps].

    p_dog: each image's probability of class `dog_index` (y = 1 for it, 0 for the other class)."""
    total = 0.0
    for label, p in zip(labels, p_dog):
        p = min(max(float(p), LOG_LOSS_EPS), 1 - LOG_LOSS_EPS)
        total += -math.log(p) if label == dog_index else -math.log(1 - p)
    return total / len(labels)


def multiclass_log_loss(labels, probs):
    """-mean(log p_true), p_true (each image's probability of its true class) clipped to [eps, 1 - eps]."""
    total = 0.0
    for label, p in zip(labels, probs):
        total += -math.log(min(max(float(p[label]), LOG_LOSS_EPS), 1 - LOG_LOSS_EPS))
    return total / len(labels)


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else None  # undefined, not 0: JSON null, '-' in the table


def _argmax(probs):
    return max(range(len(probs)), key=probs.__getitem__)  # the first of equal ones, as torch.argmax


def compute_metrics(labels, probs, classes, paths=None, worst=12):
    """Every figure of the report, from true labels and each image's probabilities.

    labels: class indices into `classes`; probs: one list of len(classes) probabilities per image, in the
    order of `classes`; the predicted class is the most probable (argmax, as training's accuracy).
    confusion_matrix[t][p] counts images of true class t predicted as p; per class, precision is None
    (JSON null) when no image was predicted as it, recall None when it has no image.
    log_loss, probabilities clipped to [1e-15, 1 - 1e-15]:
      2 classes: Kaggle's binary log loss on the second class's probability p (dog, for cat/dog):
                 -mean(y log p + (1 - y) log(1 - p)), y = 1 for the second class (log_loss);
      N != 2:    the multi-class log loss -mean(log p_true), p_true the probability of the true class
                 (multiclass_log_loss). For 2 classes whose probabilities sum to 1 the two agree.
    worst_mistakes: the `worst` wrong images with the lowest probability of their true class, lowest first;
    each {path, true, predicted, p_dog (only when "dog" is a class), p_true, p_predicted}.
    """
    if not labels:
        raise ValueError("no predictions to score")
    n, k = len(labels), len(classes)
    if any(len(p) != k for p in probs):
        raise ValueError("every image needs %d probabilities, one per class of %s" % (k, list(classes)))
    predicted = [_argmax(p) for p in probs]
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(labels, predicted):
        matrix[t][p] += 1
    per_class = {}
    for c, name in enumerate(classes):
        per_class[name] = dict(precision=_ratio(matrix[c][c], sum(matrix[t][c] for t in range(k))),
                               recall=_ratio(matrix[c][c], sum(matrix[c])), support=sum(matrix[c]))
    # Most confidently wrong: the mistakes that gave their true class the least probability. For 2 classes
    # the key is the distance of the second class's probability from the truth, the binary log loss's own
    # p, so that cat/dog reports list their mistakes in exactly the order they always have.
    dog = classes.index("dog") if "dog" in classes else None
    paths = paths or [None] * n
    mistakes = []
    for path, t, p, q in zip(paths, labels, predicted, probs):
        if t == p:
            continue
        mistake = dict(path=path, true=classes[t], predicted=classes[p])
        if dog is not None:
            mistake["p_dog"] = q[dog]
        mistake.update(p_true=q[t], p_predicted=q[p])
        key = -abs((1.0 if t == 1 else 0.0) - q[1]) if k == 2 else q[t]
        mistakes.append((key, mistake))
    mistakes.sort(key=lambda km: km[0])  # stable: equal ones in the order of the images
    loss = log_loss(labels, [p[1] for p in probs], 1) if k == 2 else multiclass_log_loss(labels, probs)
    return dict(images=n, accuracy=sum(t == p for t, p in zip(labels, predicted)) / n,
                log_loss=loss, classes=list(classes), confusion_matrix=matrix,
                per_class=per_class, mistakes=len(mistakes), worst_mistakes=[m for _, m in mistakes[:worst]])


# ---- which images ---------------------------------------------------------------------------


def training_split(meta, split, data_dir=None, model_path=None):
    """Re-create the (train, val) split of train_main.py from the arguments it stored in the meta JSON.

    Returns (data_dir, the folder's classes, samples of `split`). Same folder, same validation_split and seed
    -> the very same images (a dry run's few images included): dataset.training_samples, as training.
    A final fit (no validation split) at `model_path` is a DataError naming the run that validated its
    recipe: the one its calibration was carried from, else validated/ beside it (the shipped layout).
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
    classes, samples = find_labeled_images(data_dir)  # listed once: for the fingerprint and for the split
    warning = split_warning(meta, data_dir, picked, samples)
    if warning:
        print("warning: " + warning, file=sys.stderr)
    train, val = training_samples(data_dir, args["validation_split"], args["seed"], args.get("dry_run"),
                                  args.get("batch_size"), samples)
    chosen = val if split == "val" else train
    if not chosen:
        validated = (meta.get("calibration") or {}).get("carried_from") or validated_beside(model_path)
        raise DataError("training held out no validation images (--validation_split %g)%s" % (
            args["validation_split"], "; its recipe was validated by %s: score that with --model_path %s --split val"
            % (validated, validated) if validated else ""))
    return data_dir, classes, chosen


def validated_beside(model_path):
    """validated/NAME beside a final fit at DIR/NAME, where the shipped models keep the run that validated
    their recipe; None when there is none."""
    if not model_path:
        return None
    path = os.path.join(os.path.dirname(model_path), "validated", os.path.basename(model_path))
    return path if os.path.isfile(path) else None


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


def class_mapping(data_classes, model_classes):
    """For each class of the data (the names its labels index), the index of the model's output of the same
    name. The model may know more classes than the data holds; a data class it lacks is a DataError."""
    missing = [name for name in data_classes if name not in model_classes]
    if missing:
        raise DataError("the model's classes %s do not include the data's %s (data classes: %s)"
                        % (list(model_classes), ", ".join(missing), list(data_classes)))
    return [list(model_classes).index(name) for name in data_classes]


def score_samples(predictor, samples, classes, batch_size=32, num_workers=0, worst=12, desc="evaluating"):
    """Predict every (path, label) and score it; undecodable files are named on stderr and skipped.

    classes: the data's class names, which the samples' labels index (dataset.find_labeled_images). They are
    matched to the model's outputs by name (class_mapping); the figures are over the model's classes."""
    to_model = class_mapping(classes, predictor.classes)  # before predicting: a wrong folder fails at once
    results = predictor.predict_files([path for path, _ in samples], batch_size, num_workers, desc)
    kept = [(path, label, probs) for (path, label), (_, probs) in zip(samples, results) if probs is not None]
    if not kept:
        raise DataError("none of the %d images could be decoded" % len(samples))
    labels = [to_model[label] for _, label, _ in kept]
    metrics = compute_metrics(labels, [probs for _, _, probs in kept], tuple(predictor.classes),
                              [p for p, _, _ in kept], worst)
    metrics["skipped"] = [path for (path, _), (_, probs) in zip(samples, results) if probs is None]
    return metrics

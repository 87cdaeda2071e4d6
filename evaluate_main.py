"""Score a trained model on labeled images.

    python evaluate_main.py --conv_net base_cnn --data_dir data/train --json eval.json --report eval.png
    python evaluate_main.py --conv_net base_cnn --split val    # the held-out part of training's own split

Prints accuracy, log loss (probabilities clipped to [1e-15, 1 - 1e-15], as Kaggle
scores it), the confusion matrix, per-class precision and recall and the images
the model got most confidently wrong. Inference is models.inference's, as in predict_main.py:
the same decoding, preprocessing, engine and batching as the submission CSV.
"""
import json
import math
import os
import sys

from dataset import DataError, find_labeled_images, training_samples
from models import CLASSES, MODELS
from models.checkpoint import CheckpointError, atomic_write_text, read_meta
from parsers.evaluate_parser import build_parser
from parsers import DEFAULT_DATA_DIR, fail
from parsers.predict_parser import open_predictor

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
    if not data_dir:
        # The folder training recorded is where *that* machine kept the images (the shipped models
        # say ../shared/...); on another machine the README puts them in data/train, train_main.py's
        # default. Training's own folder wins where it exists, so a model trained here is scored on
        # exactly its split.
        recorded = args.get("data_dir")
        candidates = [d for d in (recorded, DEFAULT_DATA_DIR) if d]
        data_dir = next((d for d in candidates if os.path.isdir(d)), None)
        if data_dir is None:
            raise DataError("training's data folder %s is not here, nor is %s: pass --data_dir"
                            % (recorded or "(not recorded)", DEFAULT_DATA_DIR))
        if data_dir != recorded:
            # The split is re-created from the file names: the same images only if this folder holds the
            # same files as training's did (the shipped models: the 12,000-image subset, not Kaggle's 25,000).
            print("warning: training's folder %s is not here; re-creating its split from %s (the same images only "
                  "if it holds the same files)" % (recorded, data_dir), file=sys.stderr)
    train, val = training_samples(data_dir, args["validation_split"], args["seed"], args.get("dry_run"),
                                  args.get("batch_size"))
    chosen = val if split == "val" else train
    if not chosen:
        raise DataError("training held out no validation images (--validation_split %g)" % args["validation_split"])
    return data_dir, chosen


def select_samples(args, meta):
    if args.split == "all":
        if not args.data_dir:
            raise DataError("--data_dir is required with --split all (or use --split val to score the "
                            "images training held out)")
        return args.data_dir, find_labeled_images(args.data_dir)
    return training_split(meta, args.split, args.data_dir)


# ---- running, printing, writing -------------------------------------------------------------------

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


def _fmt(value, spec="%.4f"):
    return "-" if value is None else spec % value


def format_report(report):
    classes = report["classes"]
    counts = ", ".join("%s %d" % (c, report["per_class"][c]["support"]) for c in classes)
    lines = [
        "model      %s (%s, %dx%d)" % (report["model_path"], report["conv_net"], report["img_size"],
                                      report["img_size"]),
        "images     %s%s: %d (%s)" % (report["data_dir"], "" if report["split"] == "all" else
                                      " [%s split]" % report["split"], report["images"], counts),
    ]
    if report["skipped"]:
        lines.append("skipped    %d unreadable file(s)" % len(report["skipped"]))
    lines += ["accuracy   %.4f" % report["accuracy"], "log loss   %.4f" % report["log_loss"]]
    training = report.get("training")
    if training and training.get("val_acc") is not None:
        lines.append("training   val_acc %.4f  val_loss %.4f  (epoch %s, as recorded in the checkpoint's JSON)"
                     % (training["val_acc"], training["val_loss"], training.get("epoch")))
    width = max(9, max(len(c) for c in classes) + 2)
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * width + "".join(c.rjust(width) for c in classes)]
    for name, row in zip(classes, report["confusion_matrix"]):
        lines.append(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    lines += ["", "class".ljust(width) + "precision".rjust(11) + "recall".rjust(9) + "images".rjust(8)]
    for name in classes:
        pc = report["per_class"][name]
        lines.append(name.ljust(width) + _fmt(pc["precision"]).rjust(11) + _fmt(pc["recall"]).rjust(9)
                     + str(pc["support"]).rjust(8))
    worst = report["worst_mistakes"]
    lines.append("")
    if not worst:
        lines.append("no mistakes" if not report["mistakes"] else "%d mistakes" % report["mistakes"])
    else:
        lines.append("most confidently wrong (%d of %d mistakes)" % (len(worst), report["mistakes"]))
        lines.append("  p(dog)  true  path")
        for m in worst:
            lines.append("  %.4f  %-4s  %s" % (m["p_dog"], m["true"], m["path"]))
    return "\n".join(lines)


def draw_report(report, path):
    """Confusion matrix on the left, the worst mistakes (with their p(dog)) in a grid on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from models.transforms import ImageDecodeError, open_rgb

    worst = report["worst_mistakes"]
    cols = min(4, max(1, len(worst)))
    rows = max(1, -(-len(worst) // cols))
    fig = plt.figure(figsize=(4.5 + 2.2 * cols, max(4.5, 2.4 * rows)))
    grid = fig.add_gridspec(rows, cols + 2, width_ratios=[1.6, 0.2] + [1] * cols)

    classes, matrix = report["classes"], report["confusion_matrix"]
    ax = fig.add_subplot(grid[:, 0] if rows < 3 else grid[max(0, rows // 2 - 1):rows // 2 + 1, 0])
    peak = max(max(row) for row in matrix) or 1
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=peak)  # from 0, so the text colour below matches the cell
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            ax.text(p, t, str(count), ha="center", va="center", fontsize=14,
                    color="white" if count > peak / 2 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")

    if not worst:
        ax_text = fig.add_subplot(grid[:, 2:])
        ax_text.axis("off")
        ax_text.text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
    for i, m in enumerate(worst):
        ax_img = fig.add_subplot(grid[i // cols, 2 + i % cols])
        ax_img.axis("off")
        try:
            ax_img.imshow(open_rgb(m["path"]))
        except (ImageDecodeError, OSError, TypeError):
            pass  # the figure still names it
        ax_img.set_title("true %s, p(dog) %.3f\n%s" % (m["true"], m["p_dog"], os.path.basename(str(m["path"]))),
                         fontsize=9, color="firebrick")
    split = "" if report["split"] == "all" else " (%s split)" % report["split"]
    fig.suptitle("%s on %s%s: %d images, accuracy %.4f, log loss %.4f\nright: the most confidently wrong, "
                 "with their true class and probability of dog"
                 % (report["conv_net"], report["data_dir"], split, report["images"], report["accuracy"],
                    report["log_loss"]), fontsize=10)
    fig.tight_layout()
    try:
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, dpi=90)
    except (OSError, ValueError) as exc:
        fail("cannot write %s: %s" % (path, exc))
    finally:
        plt.close(fig)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.data_dir and not os.path.isdir(args.data_dir):
        fail("data folder not found: %s" % args.data_dir)
    model_path = args.model_path or MODELS[args.conv_net].default_model_path
    try:
        # Which images, before the model loads (and perhaps exports): a wrong folder fails at once.
        data_dir, samples = select_samples(args, read_meta(model_path) if os.path.isfile(model_path) else {})
    except (DataError, CheckpointError) as exc:
        if not os.path.isfile(model_path):
            open_predictor(args)  # says what is wrong with the checkpoint, which comes first
        fail(str(exc))
    predictor = open_predictor(args)
    try:
        metrics = score_samples(predictor, samples, args.batch_size, args.num_workers, args.worst,
                                desc="evaluating %s" % data_dir)
    except DataError as exc:
        fail(str(exc))
    report = dict(conv_net=predictor.conv_net, model_path=predictor.model_path, img_size=predictor.img_size,
                  data_dir=data_dir, split=args.split, **metrics)
    if args.split == "val":
        meta = predictor.meta
        report["training"] = dict(epoch=meta.get("epoch"), val_acc=meta.get("val_acc"), val_loss=meta.get("val_loss"))
    print(format_report(report))
    if args.json:
        try:
            atomic_write_text(json.dumps(report, indent=2) + "\n", args.json)
        except OSError as exc:
            fail("cannot write %s: %s" % (args.json, exc))
        print("\nwrote %s" % args.json)
    if args.report:
        draw_report(report, args.report)
        print("%swrote %s" % ("" if args.json else "\n", args.report))
    return report


if __name__ == "__main__":
    main()

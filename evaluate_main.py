"""Score a trained model on labeled images.

    python evaluate_main.py --conv_net base_cnn --data_dir data/train --json eval.json --report eval.png
    python evaluate_main.py --conv_net base_cnn --split val    # the held-out part of training's own split

The images: one sub-folder per class (ImageFolder), or Kaggle's flat cat.N.jpg / dog.N.jpg; any number
of classes, matched to the model's by name (the model may know more than the folder holds).
Prints accuracy, log loss (probabilities clipped to [1e-15, 1 - 1e-15]: for 2 classes Kaggle's binary
log loss on the second class's probability, dog's; for more the multi-class -mean(log p(true class))),
the NxN confusion matrix, per-class precision and recall and the images the model got most
confidently wrong. Inference is models.inference's, as in predict_main.py: the same decoding,
preprocessing, engine and batching as the submission CSV.
"""
import json
import os

from dataset import DataError, find_labeled_images
from evaluation.metrics import score_samples, training_split
from models.checkpoint import CheckpointError, atomic_write_text
from parsers.evaluate_parser import build_parser
from parsers import fail
from parsers.predict_parser import open_checkpoint, open_predictor


def select_samples(args, meta, model_path=None):
    if args.split == "all":
        if not args.data_dir:
            raise DataError("--data_dir is required with --split all (or use --split val to score the "
                            "images training held out)")
        return (args.data_dir,) + tuple(find_labeled_images(args.data_dir))
    return training_split(meta, args.split, args.data_dir, model_path)


# ---- running, printing, writing -------------------------------------------------------------------

def _fmt(value, spec="%.4f"):
    return "-" if value is None else spec % value


def format_report(report):
    """The report as text: the figures, the confusion matrix (rows: true class), per-class precision and
    recall, the worst mistakes (p(dog) for cat/dog, as ever; else p(true), true and predicted class)."""
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
    fitted = report.get("calibration")
    if fitted:
        if fitted.get("carried_from"):
            lines.append("temperature %.3f (none carried), flip TTA %s: chosen on the validation split of %s"
                         % (fitted["temperature"], "on" if fitted["flip_tta"] else "off", fitted["carried_from"]))
        else:
            lines.append("calibrated temperature %.3f, flip TTA %s: chosen on the validation split%s" % (
                fitted["temperature"], "on" if fitted["flip_tta"] else "off",
                ", so its figures above are optimistic" if report["split"] == "val" else ""))
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
        if _cat_dog(classes):  # as it always was: p(dog) says both the truth's and the prediction's
            lines.append("  p(dog)  true  path")
            for m in worst:
                lines.append("  %.4f  %-4s  %s" % (m["p_dog"], m["true"], m["path"]))
        else:
            t = max(len("true"), max(len(m["true"]) for m in worst))
            p = max(len("predicted"), max(len(m["predicted"]) for m in worst))
            lines.append("  p(true)  %s  %s  path" % ("true".ljust(t), "predicted".ljust(p)))
            for m in worst:
                lines.append("  %.4f   %s  %s  %s" % (m["p_true"], m["true"].ljust(t), m["predicted"].ljust(p),
                                                     m["path"]))
    return "\n".join(lines)


def _cat_dog(classes):
    """Two classes, one of them dog: the report speaks of p(dog), as Kaggle's Dogs vs. Cats does."""
    return len(classes) == 2 and "dog" in classes


def _short(name, most=20):
    return name if len(name) <= most else name[:most - 1] + "\u2026"  # a 100-character class name fits a tick


def draw_report(report, path):
    """The NxN confusion matrix on the left, the worst mistakes in a grid on the right.

    Matrix cells hold the counts; their colour is the share of the row (the true class's recall on the
    diagonal), so a small class reads as well as a large one. Figure, cell and font sizes follow the number
    of classes (readable to ~20). Each mistake is titled with its true class and p(dog) for cat/dog, as ever;
    with other classes, with its true and predicted class and the probability the model gave each.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from models.transforms import ImageError, open_rgb

    classes, matrix = report["classes"], report["confusion_matrix"]
    k, cat_dog = len(classes), _cat_dog(classes)
    worst = report["worst_mistakes"]
    cols = min(4, max(1, len(worst)))
    rows = max(1, -(-len(worst) // cols))
    # The matrix takes ~3.7 in up to 5 classes (cat/dog's as ever), 0.4 in more a class beyond; the figure
    # grows by as much. Tick labels, rotated beyond 3 classes or for long names, need room below and left.
    grow = max(1.0, (0.4 * k + 1.5) / 3.7)
    names = [_short(c) for c in classes]
    longest = max(len(c) for c in names)
    rotate = k > 3 or longest > 8
    cell_pt = 3.7 * grow * 0.75 / k * 72  # about: the axes lose a quarter to the labels
    tick_fs = min(10, max(6, cell_pt * 0.4))
    label_in = longest * 0.6 * tick_fs / 72  # a tick label's length, inches
    row_in = 2.4 if cat_dog else 3.0  # a third line of title: the predicted class
    height = max(4.5, row_in * rows, 3.7 * grow + (label_in * 0.75 if rotate else 0.3) + 1.2)
    fig = plt.figure(figsize=(4.5 + 2.2 * cols + 3.7 * (grow - 1) + max(0.0, label_in - 0.5), height))
    grid = fig.add_gridspec(rows, cols + 2, width_ratios=[1.6 * grow, 0.2] + [1] * cols)

    ax = fig.add_subplot(grid[:, 0] if rows < 3 or grow > 1 else grid[max(0, rows // 2 - 1):rows // 2 + 1, 0])
    shares = [[count / (sum(row) or 1) for count in row] for row in matrix]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)  # fixed range, so the text colour below matches the cell
    widest = max(len(str(count)) for row in matrix for count in row)
    count_fs = min(14, max(5, cell_pt * 0.3), max(5, cell_pt * 0.8 / (0.6 * widest)))
    for t, row in enumerate(matrix):
        for p, count in enumerate(row):
            ax.text(p, t, str(count), ha="center", va="center", fontsize=count_fs,
                    color="white" if shares[t][p] > 0.5 else "black")
    if rotate:
        ax.set_xticks(range(k), names, fontsize=tick_fs, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(k), names, fontsize=tick_fs)
    ax.set_yticks(range(k), names, fontsize=tick_fs)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title("confusion matrix\n(colour: share of the true class)", fontsize=10)

    if not worst:
        ax_text = fig.add_subplot(grid[:, 2:])
        ax_text.axis("off")
        ax_text.text(0.5, 0.5, "%d mistakes" % report["mistakes"] if report["mistakes"] else "no mistakes",
                     ha="center", va="center", fontsize=14)
    for i, m in enumerate(worst):
        ax_img = fig.add_subplot(grid[i // cols, 2 + i % cols])
        ax_img.axis("off")
        try:
            ax_img.imshow(open_rgb(m["path"]))
        except (ImageError, OSError, TypeError):
            pass  # the figure still names it
        name = os.path.basename(str(m["path"]))
        if cat_dog:
            title = "true %s, p(dog) %.3f\n%s" % (m["true"], m["p_dog"], name)
        else:
            title = "true %s, p %.3f\npredicted %s, p %.3f\n%s" % (
                _short(m["true"]), m["p_true"], _short(m["predicted"]), m["p_predicted"], _short(name, 30))
        ax_img.set_title(title, fontsize=9, color="firebrick")
    split = "" if report["split"] == "all" else " (%s split)" % report["split"]
    heading = "%s on %s%s: %d images, accuracy %.4f, log loss %.4f" % (
        report["conv_net"], report["data_dir"], split, report["images"], report["accuracy"], report["log_loss"])
    if worst:
        heading += "\nright: the most confidently wrong, %s" % (
            "with their true class and probability of dog" if cat_dog else
            "with their true and predicted class and the probability the model gave each")
    fig.suptitle(heading, fontsize=10)
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
    checkpoint = open_checkpoint(args)
    try:
        # Which images, before the model loads (and perhaps exports): a wrong folder fails at once.
        data_dir, classes, samples = select_samples(args, checkpoint.meta, checkpoint.path)
    except (DataError, CheckpointError) as exc:
        fail(str(exc))
    predictor = open_predictor(args, checkpoint)
    try:
        metrics = score_samples(predictor, samples, classes, args.batch_size, args.num_workers, args.worst,
                                desc="evaluating %s" % data_dir)
    except DataError as exc:
        fail(str(exc))
    report = dict(conv_net=predictor.conv_net, model_path=predictor.model_path, img_size=predictor.img_size,
                  data_dir=data_dir, split=args.split, **metrics)
    calibrated = predictor.meta.get("calibration")
    if calibrated:
        report["calibration"] = {k: calibrated[k] for k in ("temperature", "flip_tta", "carried_from")
                                 if k in calibrated}
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

"""Score a trained model on labeled images.

    python evaluate_main.py --conv_net base_cnn --data_dir data/train --json eval.json --report eval.png
    python evaluate_main.py --conv_net base_cnn --split val    # the held-out part of training's own split

Prints accuracy, log loss (probabilities clipped to [1e-15, 1 - 1e-15], as Kaggle
scores it), the confusion matrix, per-class precision and recall and the images
the model got most confidently wrong. Inference is models.inference's, as in predict_main.py:
the same decoding, preprocessing, engine and batching as the submission CSV.
"""
import json
import os

from dataset import DataError, find_labeled_images
from evaluation.metrics import score_samples, training_split
from models.checkpoint import CheckpointError, atomic_write_text
from parsers.evaluate_parser import build_parser
from parsers import fail
from parsers.predict_parser import open_checkpoint, open_predictor


def select_samples(args, meta):
    if args.split == "all":
        if not args.data_dir:
            raise DataError("--data_dir is required with --split all (or use --split val to score the "
                            "images training held out)")
        return args.data_dir, find_labeled_images(args.data_dir)
    return training_split(meta, args.split, args.data_dir)


# ---- running, printing, writing -------------------------------------------------------------------

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
    fitted = report.get("calibration")
    if fitted:
        lines.append("calibrated temperature %.3f, flip TTA %s: chosen on the validation split%s%s" % (
            fitted["temperature"], "on" if fitted["flip_tta"] else "off",
            " of %s" % fitted["carried_from"] if fitted.get("carried_from") else "",
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
        lines.append("  p(dog)  true  path")
        for m in worst:
            lines.append("  %.4f  %-4s  %s" % (m["p_dog"], m["true"], m["path"]))
    return "\n".join(lines)


def draw_report(report, path):
    """Confusion matrix on the left, the worst mistakes (with their p(dog)) in a grid on the right."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from models.transforms import ImageError, open_rgb

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
        except (ImageError, OSError, TypeError):
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
    checkpoint = open_checkpoint(args)
    try:
        # Which images, before the model loads (and perhaps exports): a wrong folder fails at once.
        data_dir, samples = select_samples(args, checkpoint.meta)
    except (DataError, CheckpointError) as exc:
        fail(str(exc))
    predictor = open_predictor(args, checkpoint)
    try:
        metrics = score_samples(predictor, samples, args.batch_size, args.num_workers, args.worst,
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

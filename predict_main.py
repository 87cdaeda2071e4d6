"""Classify images with a trained model.

One image, shown with its label (or saved as a figure where there is no display):
    python predict_main.py --conv_net base_cnn --img_path data/test1/2124.jpg
A folder, as a Kaggle submission (id = file stem, label = probability of dog):
    python predict_main.py --conv_net base_cnn --img_dir data/test1 --csv submission.csv
A model trained on other classes writes one probability column per class instead (id,apple,banana,...);
--topk K prints the K most probable classes of an image.

The image size, classes and dropout come from the checkpoint; decoding, preprocessing and
the engine (ONNX Runtime by default, --backend torch for PyTorch) are models.inference's,
exactly as in serving.
"""
import csv
import io
import os
import sys

from dataset import DataError, find_images
from models.checkpoint import atomic_write_text
from models.transforms import ImageError, open_rgb
from parsers import fail
from parsers.predict_parser import build_parser, open_predictor


# ---- one image ------------------------------------------------------------------------------

def has_display():
    """Whether a GUI window can open: Linux/BSD need an X11 or Wayland display."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _interactive_backend(matplotlib):
    backend = matplotlib.get_backend().lower()
    try:
        from matplotlib.backends import BackendFilter, backend_registry
        non_interactive = backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)
    except ImportError:  # matplotlib < 3.9
        non_interactive = ["agg", "cairo", "pdf", "pgf", "ps", "svg", "template"]
    return backend not in non_interactive


def default_figure_path(img_path):
    return "%s_prediction.png" % os.path.splitext(os.path.basename(img_path))[0]


def show_prediction(img, title, img_path, save=None):
    """Draw the image titled with its label; show it, or write it where showing is impossible.

    Returns the path written, or None when the figure was shown in a window.
    """
    import matplotlib
    if save or not has_display():
        matplotlib.use("Agg")  # never block, never need a display
    import matplotlib.pyplot as plt
    if not save and not _interactive_backend(matplotlib):
        save = default_figure_path(img_path)
    fig, ax = plt.subplots(figsize=(5, 5.4))
    ax.imshow(img)
    ax.set_title(title, fontsize=16)
    ax.axis("off")
    fig.tight_layout()
    if not save:
        plt.show()
        return None
    try:
        if os.path.dirname(save):
            os.makedirs(os.path.dirname(save), exist_ok=True)
        fig.savefig(save, dpi=100)
    except (OSError, ValueError) as exc:  # unwritable folder, unknown extension
        fail("cannot write the figure %s: %s" % (save, exc))
    finally:
        plt.close(fig)
    return save


def top_classes(classes, probs, k=1):
    """[(label, probability)] of the k most probable classes, best first."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    return [(classes[i], probs[i]) for i in order[:k]]


def predict_image(predictor, img_path, save=None, topk=1):
    try:
        img = open_rgb(img_path, predictor.img_size)
    except (ImageError, OSError) as exc:
        fail("%s: %s" % (img_path, exc))
    probs = predictor.probabilities(predictor.transform(img).unsqueeze(0))[0].tolist()
    best = top_classes(predictor.classes, probs, topk)
    label, prob = best[0]
    print("%s: %s (probability %.4f)" % (img_path, label, prob))
    for rank, (other, p) in enumerate(best[1:], 2):
        print("  %d. %s (probability %.4f)" % (rank, other, p))
    written = show_prediction(img, "%s (%.1f%%)" % (label, 100 * prob), img_path, save)
    if written:
        print("figure written to %s" % written)
    return label, prob


# ---- a folder -> Kaggle submission, or one column per class ---------------------------------------

KAGGLE_CLASSES = ("cat", "dog")  # a model of exactly these writes Kaggle's id,label (label: p(dog))


def submission_rows(results, classes):
    """[(id, probabilities)] for every decoded image; id is the file stem. The probabilities are those of
    every class, or for Kaggle's cat/dog models that of dog alone (Kaggle's label column)."""
    kaggle = tuple(classes) == KAGGLE_CLASSES
    dog = list(classes).index("dog") if kaggle else None
    return [(os.path.splitext(os.path.basename(path))[0], [probs[dog]] if kaggle else list(probs))
            for path, probs in results if probs is not None]


def csv_header(classes):
    """Kaggle's id,label for the cat/dog models; id and one probability column per class otherwise."""
    return ["id", "label"] if tuple(classes) == KAGGLE_CLASSES else ["id"] + list(classes)


def format_submission(rows, classes=KAGGLE_CLASSES):
    """The CSV: csv_header's columns; full float precision (repr), so nothing is lost."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_header(classes))
    for image_id, probs in rows:
        writer.writerow([image_id] + [repr(float(p)) for p in probs])
    return out.getvalue()


def predict_folder(predictor, img_dir, csv_path, batch_size=32, num_workers=0):
    try:
        paths = find_images(img_dir)
    except DataError as exc:
        fail(str(exc))
    results = predictor.predict_files(paths, batch_size, num_workers, desc="classifying %s" % img_dir)
    rows = submission_rows(results, predictor.classes)
    if not rows:
        fail("none of the %d images in %s could be decoded" % (len(paths), img_dir))
    ids = [image_id for image_id, _ in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
    if duplicates:
        print("warning: several files share the id(s) %s; the submission has one row per file"
              % ", ".join(duplicates[:5]), file=sys.stderr)
    text = format_submission(rows, predictor.classes)
    skipped = len(paths) - len(rows)
    summary = "wrote %d predictions to %s" % (len(rows), "standard output" if csv_path == "-" else csv_path)
    if skipped:
        summary += " (%d unreadable file%s skipped)" % (skipped, "" if skipped == 1 else "s")
    if csv_path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        print(summary, file=sys.stderr)
    else:
        try:
            atomic_write_text(text, csv_path)
        except OSError as exc:
            fail("cannot write %s: %s" % (csv_path, exc))
        print(summary)
    return rows


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.topk != 1 and args.img_dir is not None:
        parser.error("--topk goes with --img_path (a folder's CSV has every class's probability)")
    if args.img_dir is not None:
        if args.save:
            parser.error("--save goes with --img_path (a folder writes --csv)")
        if not args.csv:
            parser.error("--img_dir needs --csv OUT.csv (or --csv - for standard output)")
        if not os.path.isdir(args.img_dir):
            fail("image folder not found: %s" % args.img_dir)
    elif args.csv:
        parser.error("--csv goes with --img_dir")
    elif not os.path.isfile(args.img_path):
        fail("image not found: %s" % args.img_path)
    predictor = open_predictor(args)
    if args.img_dir is not None:
        predict_folder(predictor, args.img_dir, args.csv, args.batch_size, args.num_workers)
    else:
        predict_image(predictor, args.img_path, args.save, args.topk)


if __name__ == "__main__":
    main()

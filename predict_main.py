"""Classify images with a trained model.

One image, shown with its label (or saved as a figure where there is no display):
    python predict_main.py --conv_net base_cnn --img_path data/test1/2124.jpg
A folder, as a Kaggle submission (id = file stem, label = probability of dog):
    python predict_main.py --conv_net base_cnn --img_dir data/test1 --csv submission.csv

The image size, classes and dropout come from the JSON training wrote beside the
weights; decoding and preprocessing are models.transforms, exactly as in training
and serving.
"""
import csv
import io
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import DataError, find_images, read_error
from models import CLASSES, MODELS, load_trained
from models.checkpoint import CheckpointError, atomic_write_text, read_meta
from models.transforms import ImageDecodeError, eval_transform, open_rgb
from parsers import fail, pick_device
from parsers.predict_parser import build_parser


def decode(path, img_size):
    """(model input tensor, None), or (None, why) for a file that is not an image we can read."""
    try:
        return eval_transform(img_size)(open_rgb(path, img_size)), None
    except ImageDecodeError as exc:
        return None, str(exc)
    except OSError as exc:  # unreadable file (permissions, a broken symbolic link, ...)
        return None, read_error(path, exc)


class _ImageFiles(Dataset):
    """Decodes in DataLoader workers, so JPEG decoding overlaps the forward pass."""

    def __init__(self, paths, img_size):
        self.paths, self.img_size = paths, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        tensor, error = decode(self.paths[i], self.img_size)
        return i, tensor, error


def _as_list(items):
    return items


class Predictor:
    """A trained model in eval mode, channels_last, plus what its checkpoint says about it."""

    def __init__(self, conv_net, model_path, device="cpu"):
        if not os.path.isfile(model_path):
            raise CheckpointError("no checkpoint at %s (train one with train_main.py --conv_net %s, "
                                  "or pass --model_path)" % (model_path, conv_net))
        model, self.img_size = load_trained(conv_net, model_path)
        self.meta = read_meta(model_path)
        self.classes = tuple(self.meta.get("classes") or CLASSES)
        if "dog" not in self.classes:
            raise CheckpointError("%s: its classes %s have no 'dog'" % (model_path, list(self.classes)))
        self.dog_index = self.classes.index("dog")
        self.conv_net, self.model_path, self.device = conv_net, model_path, torch.device(device)
        # NHWC: about twice as fast for convolutions on CPU, and the same numbers.
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.transform = eval_transform(self.img_size)

    @torch.no_grad()
    def probabilities(self, batch):
        """Normalized N x 3 x S x S batch -> N x classes softmax probabilities (float32, CPU)."""
        x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return F.softmax(self.model(x).float(), dim=1).cpu()

    def predict_files(self, paths, batch_size=32, num_workers=0, desc="predicting"):
        """[(path, probabilities as a list, or None)] in the order of `paths`.

        Files that cannot be decoded are named on stderr and get None; they never stop the run.
        """
        batches = -(-len(paths) // batch_size)
        workers = min(num_workers, batches) if batches > 1 else 0  # one batch: nothing to overlap
        loader = DataLoader(_ImageFiles(paths, self.img_size), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=_as_list)
        results = [None] * len(paths)
        with tqdm(total=len(paths), desc=desc, unit="img", leave=False, mininterval=1.0, file=sys.stderr) as bar:
            for items in loader:
                good = [(i, tensor) for i, tensor, _ in items if tensor is not None]
                for i, _, error in items:
                    if error is not None:
                        tqdm.write("warning: skipping %s: %s" % (paths[i], error), file=sys.stderr)
                if good:
                    probs = self.probabilities(torch.stack([tensor for _, tensor in good])).tolist()
                    for (i, _), p in zip(good, probs):
                        results[i] = p
                bar.update(len(items))
        return list(zip(paths, results))


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


def predict_image(predictor, img_path, save=None):
    if not os.path.isfile(img_path):
        fail("image not found: %s" % img_path)
    try:
        img = open_rgb(img_path, predictor.img_size)
    except (ImageDecodeError, OSError) as exc:
        fail("%s: %s" % (img_path, exc))
    probs = predictor.probabilities(predictor.transform(img).unsqueeze(0))[0].tolist()
    index = max(range(len(probs)), key=probs.__getitem__)
    label, prob = predictor.classes[index], probs[index]
    print("%s: %s (probability %.4f)" % (img_path, label, prob))
    written = show_prediction(img, "%s (%.1f%%)" % (label, 100 * prob), img_path, save)
    if written:
        print("figure written to %s" % written)
    return label, prob


# ---- a folder -> Kaggle submission ---------------------------------------------------------------

def submission_rows(results, dog_index):
    """[(id, probability of dog)] for every decoded image; id is the file stem."""
    return [(os.path.splitext(os.path.basename(path))[0], probs[dog_index])
            for path, probs in results if probs is not None]


def format_submission(rows):
    """Kaggle's format: header id,label; full float precision (repr), so nothing is lost."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "label"])
    for image_id, p_dog in rows:
        writer.writerow([image_id, repr(float(p_dog))])
    return out.getvalue()


def predict_folder(predictor, img_dir, csv_path, batch_size=32, num_workers=0):
    try:
        paths = find_images(img_dir)
    except DataError as exc:
        fail(str(exc))
    results = predictor.predict_files(paths, batch_size, num_workers, desc="classifying %s" % img_dir)
    rows = submission_rows(results, predictor.dog_index)
    if not rows:
        fail("none of the %d images in %s could be decoded" % (len(paths), img_dir))
    ids = [image_id for image_id, _ in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) < len(ids) else []
    if duplicates:
        print("warning: several files share the id(s) %s; the submission has one row per file"
              % ", ".join(duplicates[:5]), file=sys.stderr)
    text = format_submission(rows)
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


def load_predictor(args):
    """The checkpoint named by --conv_net/--model_path, or exit 2 with one line saying what is wrong."""
    args.model_path = args.model_path or MODELS[args.conv_net].default_model_path
    device = pick_device(args.device)
    try:
        return Predictor(args.conv_net, args.model_path, device)
    except CheckpointError as exc:
        fail(str(exc))


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
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
    predictor = load_predictor(args)
    if args.img_dir is not None:
        predict_folder(predictor, args.img_dir, args.csv, args.batch_size, args.num_workers)
    else:
        predict_image(predictor, args.img_path, args.save)


if __name__ == "__main__":
    main()

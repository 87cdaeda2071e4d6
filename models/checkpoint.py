"""Checkpoint files, shared by training, prediction and serving.

For `--model_path models/x/model_x.pth` training writes:
  model_x.pth          the best model's state_dict (what TorchServe's --serialized-file wants)
  model_x.json         what is needed to rebuild and feed it: conv_net, img_size, classes, ...
  model_x.resume.pt    full training state (model, optimizer, epoch, best loss, args) for --resume
  model_x.metrics.jsonl, model_x.curve.png   one line per epoch, and the learning curves
  index_to_name.json   TorchServe's label file of the model's classes (also in the weights and model_x.json)
Every write goes to a temporary file first and is moved into place with os.replace,
so a kill never leaves half a file.
"""
import functools
import hashlib
import json
import os
import tempfile
import time

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model; the message says which."""


def sidecar_path(model_path, suffix):
    stem, _ = os.path.splitext(model_path)
    return stem + suffix


def meta_path(model_path):
    return sidecar_path(model_path, ".json")


def index_to_name_path(model_path):
    """TorchServe's label file of a checkpoint: index_to_name.json in its folder (training writes it there)."""
    return os.path.join(os.path.dirname(os.path.abspath(model_path)), "index_to_name.json")


def index_to_name_text(classes):
    """TorchServe's index_to_name.json of `classes`: {"0": "cat", "1": "dog"}, as models/index_to_name.json."""
    return json.dumps({str(i): name for i, name in enumerate(classes)}) + "\n"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Write a file that is either whole or not there: `write(f)` fills a temporary file in the same
    folder (binary mode), which is fsync'd and then renamed over `path`. A kill at any moment leaves
    the old file or the new one, never half of one. Every file the project writes goes through here."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(data, path):
    atomic_write(path, lambda f: f.write(data))


def save_model(model, meta, model_path):
    """The weights as a plain state_dict (loadable with weights_only=True) plus its meta JSON."""
    state = {k: v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v  # _extra_state: the classes
             for k, v in model.state_dict().items()}
    atomic_torch_save(state, model_path)
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", meta_path(model_path))


def keep_previous(model_path):
    """Move an existing model (weights and meta JSON) aside before a new run replaces it.

    Returns the new name of the weights, or None when there was nothing there. A user's
    model is never lost to a training run: it becomes model_x.previous-<its mtime>.pth.
    """
    if not os.path.exists(model_path):
        return None
    stem, ext = os.path.splitext(model_path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(model_path)))
    kept = "%s.previous-%s%s" % (stem, stamp, ext)
    os.replace(model_path, kept)
    if os.path.exists(meta_path(model_path)):
        os.replace(meta_path(model_path), meta_path(kept))
    return kept


def read_meta(model_path):
    """The meta JSON beside `model_path`, or {} when there is none (e.g. weights from elsewhere)."""
    path = meta_path(model_path)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError("cannot read %s: %s" % (path, exc))


# What to do about weights that cannot be loaded (--resume checkpoints say their own).
WEIGHTS_FIX = "pass the .pth file training wrote (--model_path), or train the model again"


def one_line(exc):
    """The gist of an exception in one short line: some have no message (EOFError), some a paragraph."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= 100 else text[:97] + "..."
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


def load_checkpoint(path, fix=WEIGHTS_FIX):
    """torch.load(weights_only=True) of `path`, which unpickles tensors and containers but never code.

    Whatever cannot be loaded (missing, unreadable, empty, truncated, not a PyTorch file, or a
    pickled object) is a CheckpointError: one line naming the file and `fix`, what to do about it.
    """
    if not os.path.isfile(path):
        raise CheckpointError("no checkpoint at %s" % path)
    if os.path.getsize(path) == 0:  # torch.load says only EOFError()
        raise CheckpointError("cannot load %s: the file is empty (0 bytes); %s" % (path, fix))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # permissions, I/O errors
        raise CheckpointError("cannot read %s: %s; %s" % (path, exc.strerror or one_line(exc), fix))
    except Exception as exc:  # truncated zip, pickle errors, objects weights_only refuses to unpickle...
        raise CheckpointError("cannot load %s: truncated, corrupt or not a PyTorch checkpoint (%s); %s"
                              % (path, one_line(exc), fix))


def check_writable(path, fix):
    """Create the folder of `path` and make sure files can be written there; else a CheckpointError
    naming `path` and `fix`. Training calls it before decoding a single image: an unwritable
    --model_path is found in a second, not when the first epoch ends.
    """
    if os.path.isdir(path):
        raise CheckpointError("cannot write %s: it is a folder; %s" % (path, fix))
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError("cannot write %s: %s (%s); %s" % (path, exc.strerror or exc, exc.filename or directory,
                                                               fix))


def read_weights(model_path):
    """The state_dict at `model_path` (load_checkpoint's), which must be a dict: else a CheckpointError."""
    state = load_checkpoint(model_path)
    if not isinstance(state, dict):
        raise CheckpointError("%s does not hold a state_dict; %s" % (model_path, WEIGHTS_FIX))
    return state


def weights_classes(state):
    """The class names a state_dict carries (the model files' "_extra_state"), or None for older weights."""
    extra = state.get("_extra_state")
    return tuple(extra.get("classes") or ()) or None if isinstance(extra, dict) else None


def load_weights(model, model_path, conv_net, state=None):
    """Load `model_path` (its state_dict `state`, when read already) into `model`; a checkpoint of another
    architecture, or of another number of classes, is a CheckpointError."""
    state = read_weights(model_path) if state is None else state
    try:
        model.load_state_dict(state)
    except RuntimeError:
        trained_as = read_meta(model_path).get("conv_net")
        if trained_as == conv_net:  # the right name but other layers: saved by another version of the network
            raise CheckpointError("%s was trained as %s, but its weights do not fit the current %s network (saved by "
                                  "another version of it?); train the model again"
                                  % (model_path, conv_net, conv_net)) from None
        hint = " (it was trained as --conv_net %s)" % trained_as if trained_as else ""
        raise CheckpointError("%s is not a %s checkpoint%s; %s" % (model_path, conv_net, hint, WEIGHTS_FIX)) from None
    return model


class Checkpoint:
    """A trained model on disk, opened once: what prediction, evaluation, the ONNX export and the archive
    script need of it, each worked out once. The meta JSON is read when it is opened (a missing file or a
    checkpoint of another network is a CheckpointError then); the network with its weights and the weights'
    SHA-256 on first use.

    img_size: the side the model is fed, in models.handler.pick_img_size's order (the weights, then the meta
    JSON, then the registry's serving size); classes: its output labels in models.handler.pick_labels' order
    (the weights, then the meta JSON, then index_to_name.json beside it, then models.CLASSES)."""

    def __init__(self, conv_net, path):
        if not os.path.isfile(path):
            raise CheckpointError("no checkpoint at %s (train one with train_main.py --conv_net %s, or pass "
                                  "--model_path)" % (path, conv_net))
        self.conv_net, self.path, self.label_warnings = conv_net, path, []
        self.meta = read_meta(path)
        trained_as = self.meta.get("conv_net", conv_net)
        if trained_as != conv_net:
            raise CheckpointError("%s is a %s checkpoint, not %s (pass --conv_net %s)"
                                  % (path, trained_as, conv_net, trained_as))

    @functools.cached_property
    def state(self):
        """The weights' state_dict, read once (a CheckpointError when the file is not one)."""
        return read_weights(self.path)

    @functools.cached_property
    def model(self):
        """The network with these weights, in eval mode (a CheckpointError when they do not fit it)."""
        from models import build_model
        model = build_model(self.conv_net, dropout=self.meta.get("dropout"), classes=self.classes)
        model = load_weights(model, self.path, self.conv_net, self.state).eval()
        self.__dict__.pop("state", None)  # the model holds the tensors now
        return model

    @functools.cached_property
    def img_size(self):
        from models import MODELS, serving_size
        from models.transforms import pick_img_size
        return pick_img_size(None, serving_size(self.model), self.meta.get("img_size"),
                             MODELS[self.conv_net].eval_img_size)[0]

    @functools.cached_property
    def classes(self):
        from models import CLASSES
        from models.transforms import pick_labels
        names, _, self.label_warnings = pick_labels(weights_classes(self.state), self.meta.get("classes"),
                                                    self.index_to_name or CLASSES)
        return tuple(names)

    @property
    def index_to_name(self):
        """The index_to_name.json training wrote beside the weights ({} when there is none)."""
        path = index_to_name_path(self.path)
        if not os.path.isfile(path):
            return {}
        try:
            with open(path) as f:
                mapping = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError("cannot read %s: %s" % (path, exc))
        return mapping if isinstance(mapping, dict) else {}

    @functools.cached_property
    def sha256(self):
        """Of the weights file: what an ONNX export records as its source, to tell a current one from a stale one."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @property
    def onnx_path(self):
        """Where its ONNX export lives: beside it, same stem."""
        return sidecar_path(self.path, ".onnx")

"""Checkpoint files, shared by training, prediction and serving.

For `--model_path models/x/model_x.pth` training writes:
  model_x.pth          the best model's state_dict (what TorchServe's --serialized-file wants)
  model_x.json         what is needed to rebuild and feed it: conv_net, img_size, classes, ...
  model_x.resume.pt    full training state (model, optimizer, epoch, best loss, args) for --resume
  model_x.metrics.jsonl, model_x.curve.png   one line per epoch, and the learning curves
Every write goes to a temporary file first and is moved into place with os.replace,
so a kill never leaves half a file.
"""
import json
import os
import tempfile

import torch


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model; the message says which."""


def sidecar_path(model_path, suffix):
    stem, _ = os.path.splitext(model_path)
    return stem + suffix


def meta_path(model_path):
    return sidecar_path(model_path, ".json")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
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
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_model(model, meta, model_path):
    """The weights as a plain state_dict (loadable with weights_only=True) plus its meta JSON."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save(state, model_path)
    atomic_write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", meta_path(model_path))


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


def load_state_dict(model_path):
    if not os.path.isfile(model_path):
        raise CheckpointError("no checkpoint at %s" % model_path)
    try:
        return torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, not a torch file...
        raise CheckpointError("cannot load %s: %s" % (model_path, str(exc).splitlines()[0]))


def load_weights(model, model_path, conv_net):
    """Load `model_path` into `model`; a checkpoint of another architecture is a CheckpointError."""
    state = load_state_dict(model_path)
    if not isinstance(state, dict):
        raise CheckpointError("%s does not hold a state_dict" % model_path)
    try:
        model.load_state_dict(state)
    except RuntimeError:
        trained_as = read_meta(model_path).get("conv_net")
        hint = " (it was trained as --conv_net %s)" % trained_as if trained_as else ""
        raise CheckpointError("%s is not a %s checkpoint%s" % (model_path, conv_net, hint)) from None
    return model

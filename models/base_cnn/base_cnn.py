"""The original README's "basic" CNN, trained from scratch.

Exactly as the original describes it: four convolutional blocks (Conv layer,
BatchNorm, ReLU, Dropout), each followed by a 2x2 max-pooling, with 64, 128,
256 and 512 output channels, then a classifier with one hidden fully connected
layer of 100 units.

Choices the original leaves open: 3x3 kernels with padding 1 (each block keeps
its input size until the pooling), and a global average pooling between the
512-channel map and the 100-unit layer, so the head does not depend on the input
size and one network takes every --img_size.

Also the `--model-file` of the TorchServe archive: one nn.Module, built with no
arguments, torch only. The `img_size` buffer travels in the state_dict: it is the
resolution the weights are meant to be fed at, so an archive made of just this
file and the .pth (the original README's torch-model-archiver command) still
preprocesses correctly.
"""
import torch
from torch import nn

CHANNELS = (64, 128, 256, 512)
HIDDEN = 100
DEFAULT_IMG_SIZE = 72


def conv_block(in_ch, out_ch, dropout):
    return [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.MaxPool2d(2)]


class BaseCNN(nn.Module):
    def __init__(self, num_classes=2, dropout=0.1):
        super().__init__()
        layers, in_ch = [], 3
        for out_ch in CHANNELS:
            layers += conv_block(in_ch, out_ch, dropout)
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_ch, HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN, num_classes),
        )
        self.register_buffer("img_size", torch.tensor(DEFAULT_IMG_SIZE))
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
        return self.classifier(self.features(x))

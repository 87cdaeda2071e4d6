"""torchvision's VGG19 with batch norm, its classifier adapted to 2 classes.

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

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))

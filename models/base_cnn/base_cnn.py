"""A small CNN trained from scratch: the baseline every other model is compared with.

Also the `--model-file` of the TorchServe archive: one nn.Module, built with no
arguments, torch only.

Shape chosen for a 2-core CPU: a stride-2 stem halves the input before any
full-width convolution, so a 112 px image costs less than a 64 px one did with
a full-resolution first stage, and then four VGG-style stages of two 3x3
convolutions each (BatchNorm, ReLU), a max-pool between stages.
"""
from torch import nn

STEM = 24
STAGES = (32, 64, 128, 256)


def conv_bn_relu(in_ch, out_ch, stride=1):
    # BatchNorm makes the conv bias redundant.
    return [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class BaseCNN(nn.Module):
    def __init__(self, num_classes=2, dropout=0.3):
        super().__init__()
        layers = conv_bn_relu(3, STEM, stride=2)
        in_ch = STEM
        for out_ch in STAGES:
            layers += conv_bn_relu(in_ch, out_ch) + conv_bn_relu(out_ch, out_ch) + [nn.MaxPool2d(2)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Global average pooling makes the head independent of the input size,
        # so one architecture serves any --img_size.
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_ch, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

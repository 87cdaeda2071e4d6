"""A small CNN trained from scratch: the baseline every other model is compared with.

Also the `--model-file` of the TorchServe archive: one nn.Module, built with no
arguments, torch only.
"""
from torch import nn

CHANNELS = (64, 128, 256, 512)


class BaseCNN(nn.Module):
    def __init__(self, num_classes=2, dropout=0.3, conv_dropout=0.05):
        super().__init__()
        layers = []
        in_ch = 3
        for out_ch in CHANNELS:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),  # BN makes the bias redundant
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.Dropout(conv_dropout),
                nn.MaxPool2d(2),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Global average pooling makes the head independent of the input size,
        # so one architecture serves any --img_size.
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(CHANNELS[-1], 100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))

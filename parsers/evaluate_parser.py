"""Command-line flags of evaluate_main.py."""

from parsers import DEFAULT_DATA_DIR, DefaultsHelpFormatter, OneLineErrorParser, non_negative_int
from parsers.predict_parser import add_model_arguments


def build_parser():
    p = OneLineErrorParser(
        description="Score a trained model on labeled images of any number of classes: accuracy, log loss "
                    "(as Kaggle scores it for 2 classes, multi-class for more), confusion matrix, per-class "
                    "precision and recall, and the most confidently wrong images.",
        formatter_class=DefaultsHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--data_dir", default=None,
                   help="labeled images: one sub-folder per class (ImageFolder), or Kaggle's flat cat.N.jpg / "
                        "dog.N.jpg; their classes are matched to the model's by name "
                        "(with --split val/train: default the folder training used, from the checkpoint's JSON, "
                        "where it exists here, else %s)" % DEFAULT_DATA_DIR)
    p.add_argument("--split", choices=["all", "val", "train"], default="all",
                   help="all: every image of --data_dir; val / train: re-create the split training made "
                        "(its --validation_split and --seed, read from the checkpoint's JSON) and score that part")
    p.add_argument("--json", metavar="OUT.json", help="also write every figure as JSON here")
    p.add_argument("--report", metavar="OUT.png",
                   help="also draw the confusion matrix and the worst mistakes into this PNG")
    p.add_argument("--worst", type=non_negative_int, default=12, metavar="N",
                   help="how many of the most confidently wrong images to list and draw")
    return p

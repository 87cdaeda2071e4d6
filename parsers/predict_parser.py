"""Command-line flags of predict_main.py (and the options evaluate_main.py shares with it)."""

from models import weights_path
from parsers import (DefaultsHelpFormatter, OneLineErrorParser, add_conv_net, fail, non_negative_int, pick_device,
                     positive_int)


def add_model_arguments(p):
    """--conv_net, --model_path and the inference options; everything else comes from the checkpoint."""
    add_conv_net(p, "model the checkpoint was trained as")
    p.add_argument("--model_path", default=None,
                   help="trained weights; the image size and the rest are read from the JSON training wrote "
                        "beside them (default: models/<conv_net>/model_<conv_net>.pth)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per forward pass")
    p.add_argument("--num_workers", type=non_negative_int, default=2,
                   help="threads that decode the next batch while the model runs")
    p.add_argument("--backend", choices=["onnx", "torch"], default=None,
                   help="inference engine: onnx (ONNX Runtime on the checkpoint's ONNX export, exported and "
                        "checked on first use; several times faster on a CPU) or torch (PyTorch eager, needed "
                        "for CUDA) (default: onnx where onnxruntime is installed and the device is the CPU)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="intra-op threads of the engine (0: its default, one per core)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when available")


def open_checkpoint(args):
    """The checkpoint the flags name (--model_path, else the shipped weights of --conv_net), opened once
    (models.checkpoint.Checkpoint), or exit 2 with one line saying what is wrong."""
    from models.checkpoint import Checkpoint, CheckpointError
    args.model_path = weights_path(args.conv_net, args.model_path)
    try:
        return Checkpoint(args.conv_net, args.model_path)
    except CheckpointError as exc:
        fail(str(exc))


def open_predictor(args, checkpoint=None):
    """The Predictor the shared flags describe (on `checkpoint` when the caller has opened it already), or
    exit 2 with one line saying what is wrong."""
    from models.checkpoint import CheckpointError
    from models.inference import Predictor, default_backend

    checkpoint = checkpoint or open_checkpoint(args)
    device = pick_device(args.device)
    backend = args.backend or ("torch" if device.type != "cpu" else default_backend())
    try:
        return Predictor(checkpoint, backend, args.threads, device)
    except CheckpointError as exc:
        fail(str(exc))


def build_parser():
    p = OneLineErrorParser(
        description="Classify images with a trained model: one image (prints the label and draws the image "
                    "with it), or a whole folder (writes a CSV: Kaggle's submission for the cat/dog models).",
        formatter_class=DefaultsHelpFormatter)
    add_model_arguments(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--img_path", help="one image to classify and show")
    source.add_argument("--img_dir", help="a folder of images to classify (e.g. Kaggle's test1/); needs --csv")
    p.add_argument("--csv", metavar="OUT.csv",
                   help="with --img_dir: the CSV to write ('-': standard output): for the cat/dog models Kaggle's "
                        "submission, header id,label with label the probability of dog; for other classes, id "
                        "and one probability column per class")
    p.add_argument("--topk", type=positive_int, default=1, metavar="K",
                   help="with --img_path: also print the K most probable classes")
    p.add_argument("--save", metavar="FIG.png",
                   help="with --img_path: write the figure here instead of showing it (with no display and "
                        "no --save it goes to <image name>_prediction.png in the working directory)")
    return p

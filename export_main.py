"""Export a trained checkpoint to ONNX, checked against PyTorch on real images.

    python export_main.py --conv_net base_cnn        # models/base_cnn/model_base_cnn.pth -> .onnx beside it
    python export_main.py --conv_net efficientnet_lite0 \
        --model_path runs/efficientnet_lite0/model_efficientnet_lite0.pth

The ONNX file goes beside the checkpoint (same stem) unless --out says otherwise. It has a
dynamic batch axis and the image side the checkpoint was trained for, and records the
SHA-256 of the weights it came from, so predict, evaluate and deployment/archive.sh can tell
a current export from a stale one. An export whose probabilities differ from PyTorch's by
more than 1e-4 on any check image fails (exit 2) and writes nothing.
"""
import os

from models.checkpoint import CheckpointError
from models.inference import EXPORT_ATOL, SAMPLE_IMAGES, ExportError, current_onnx, export_onnx
from parsers import DefaultsHelpFormatter, OneLineErrorParser, add_conv_net, fail
from parsers.predict_parser import open_checkpoint


def build_parser():
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_conv_net(p, "model the checkpoint was trained as")
    p.add_argument("--model_path", default=None,
                   help="the checkpoint (default: models/<conv_net>/model_<conv_net>.pth)")
    p.add_argument("--out", default=None, help="ONNX file to write (default: the checkpoint's path with .onnx)")
    p.add_argument("--check_images", default=SAMPLE_IMAGES, help="folder of real images the export is checked on")
    p.add_argument("--force", action="store_true", help="export even when the file beside the checkpoint is current")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    checkpoint = open_checkpoint(args)
    if not os.path.isdir(args.check_images):
        fail("check image folder not found: %s" % args.check_images)
    out = args.out or checkpoint.onnx_path
    try:
        if not args.force and out == checkpoint.onnx_path and current_onnx(checkpoint) is not None:
            print("%s is current (exported from these weights); --force exports again" % out)
            return out
        path, worst = export_onnx(checkpoint, out, args.check_images)
    except (CheckpointError, ExportError, RuntimeError, ImportError) as exc:
        fail(str(exc).splitlines()[0])
    print("wrote %s (largest probability difference from torch on the check images: %.1e, limit %.0e)"
          % (path, worst, EXPORT_ATOL))
    return path


if __name__ == "__main__":
    main()

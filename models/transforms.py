"""The project's one import surface of models/handler.py, and the training augmentation.

Decoding, the deterministic eval transform and the two engines are defined once, in
models/handler.py, because the TorchServe archive must work from the handler file alone (the
original README's archiver command packs nothing else). Training, prediction, evaluation and
export import them from here, never from the handler itself (tests/test_layout.py holds that).
What only training needs, the augmentation, lives here.
"""
import os

from torchvision import transforms as T

from models.handler import (ACCEPTED_FORMATS, ENGINES, IMAGENET_MEAN, IMAGENET_STD, MAX_FULL_DECODE_PIXELS,
                            MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, ONNX_RUNTIME_MISSING, ImageError, eval_transform,
                            normalize, onnx_engine, onnx_img_size, onnx_session, open_rgb, pick_img_size, pick_labels,
                            pick_topk, preprocess_image, resize, to_rgb, to_uint8_tensor, torch_engine)

__all__ = ["ACCEPTED_FORMATS", "ENGINES", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_FULL_DECODE_PIXELS",
           "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "ONNX_RUNTIME_MISSING", "ImageError", "eval_transform", "normalize",
           "onnx_engine", "onnx_img_size", "onnx_session", "open_rgb", "pick_img_size", "pick_labels", "pick_topk",
           "preprocess_image", "resize", "to_rgb", "to_uint8_tensor", "torch_engine", "train_augment",
           "IMAGE_EXTENSIONS", "is_image_file", "read_error", "decode_file"]

# What a folder's image files are called: the project lists folders by name (datasets, export check images).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif")


def is_image_file(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def read_error(path, exc):
    """Why `path` cannot be read, in one phrase; a symbolic link says where it points."""
    why = "cannot read file: %s" % (exc.strerror or exc)
    if os.path.islink(path):
        why += " (a symbolic link to %s)" % os.readlink(path)
    return why


def decode_file(path, img_size, transform):
    """(transform(the decoded image), None), or (None, why) for a file that is not an image we can read:
    training's decode-once cache and prediction both decode a file through here."""
    try:
        return transform(open_rgb(path, img_size)), None
    except ImageError as exc:
        return None, str(exc)
    except OSError as exc:  # unreadable file: permissions, a broken or looping symbolic link...
        return None, read_error(path, exc)


def train_augment(img_size):
    """uint8 CHW tensor (already resized to img_size) -> augmented uint8 tensor.

    Mild random-resized crop (keeps most of the animal), flip and colour jitter.
    """
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])

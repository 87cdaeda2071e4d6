"""The project's one import surface of models/handler.py, and the training augmentation.

Decoding, the deterministic eval transform and the two engines are defined once, in
models/handler.py, because the TorchServe archive must work from the handler file alone (the
original README's archiver command packs nothing else). Training, prediction, evaluation and
export import them from here, never from the handler itself (tests/test_layout.py holds that).
What only training needs, the augmentation, lives here.
"""
from torchvision import transforms as T

from models.handler import (ACCEPTED_FORMATS, ENGINES, IMAGENET_MEAN, IMAGENET_STD, MAX_FULL_DECODE_PIXELS,
                            MAX_IMAGE_PIXELS, ONNX_RUNTIME_MISSING, ImageError, eval_transform, normalize,
                            onnx_engine, onnx_img_size, onnx_session, open_rgb, pick_img_size, pick_labels, resize,
                            to_rgb, to_uint8_tensor, torch_engine)

__all__ = ["ACCEPTED_FORMATS", "ENGINES", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_FULL_DECODE_PIXELS",
           "MAX_IMAGE_PIXELS", "ONNX_RUNTIME_MISSING", "ImageError", "eval_transform", "normalize", "onnx_engine",
           "onnx_img_size", "onnx_session", "open_rgb", "pick_img_size", "pick_labels", "resize", "to_rgb",
           "to_uint8_tensor", "torch_engine", "train_augment"]


def train_augment(img_size):
    """uint8 CHW tensor (already resized to img_size) -> augmented uint8 tensor.

    Mild random-resized crop (keeps most of the animal), flip and colour jitter.
    """
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])

"""Image preprocessing for training, prediction and serving.

Decoding and the deterministic eval transform are defined once, in models/handler.py,
because the TorchServe archive must work from the handler file alone (the original
README's archiver command packs nothing else); training and prediction import them
from there. What only training needs, the augmentation, lives here.
"""
from torchvision import transforms as T

from models.handler import (ACCEPTED_FORMATS, IMAGENET_MEAN, IMAGENET_STD, MAX_FULL_DECODE_PIXELS, MAX_IMAGE_PIXELS,
                            DogsVsCatsHandler, eval_transform, normalize, open_rgb, resize, to_rgb, to_uint8_tensor)

ImageDecodeError = DogsVsCatsHandler.BadInput  # the bytes are not an image we can classify

__all__ = ["ACCEPTED_FORMATS", "IMAGENET_MEAN", "IMAGENET_STD", "MAX_FULL_DECODE_PIXELS", "MAX_IMAGE_PIXELS",
           "ImageDecodeError", "eval_transform", "normalize", "open_rgb", "resize", "to_rgb", "to_uint8_tensor",
           "train_augment"]


def train_augment(img_size):
    """uint8 CHW tensor (already resized to img_size) -> augmented uint8 tensor.

    Mild random-resized crop (keeps most of the animal), flip and colour jitter.
    """
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])

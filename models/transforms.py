"""Image decoding and preprocessing: the one definition that training, prediction
and serving all use, so the three never drift.

Self-contained (PIL, torch, torchvision only; Python 3.9 syntax) because the
TorchServe archive ships this file next to the handler.
"""
import io

import torch
from PIL import Image, ImageFile, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 40 megapixels is well above any photo a phone takes (~12-50 MP is rare) and far
# below what a decompression bomb claims; checked from the header, before decoding.
MAX_IMAGE_PIXELS = 40_000_000

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not grey pixels


class ImageDecodeError(ValueError):
    """The bytes are not an image we can classify; the message says why."""


def open_rgb(source):
    """Decode a path, bytes or file object into an upright RGB PIL image.

    Handles what cameras and editors produce: EXIF orientation, grayscale,
    16-bit, palette, CMYK and images with alpha (composited onto white, the
    colour a transparent background shows in a browser).
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty input: no image bytes received")
        source = io.BytesIO(source)
    try:
        img = Image.open(source)
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(
                "image too large: %dx%d pixels (limit %d)" % (width, height, MAX_IMAGE_PIXELS))
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("image too large: %s" % exc)
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognized format)")
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError("cannot decode image: %s" % (str(exc) or type(exc).__name__))
    return to_rgb(img)


def to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # 16-bit / float grayscale: scale to 8 bits instead of clipping to white
        img = ImageOps.autocontrast(img.convert("I").point(lambda v: v / 256).convert("L"))
    return img.convert("RGB")


def resize(img, img_size):
    """Squash to img_size x img_size: the whole animal stays in view (no centre crop)."""
    return img.resize((img_size, img_size), Image.BILINEAR, reducing_gap=None)


def to_uint8_tensor(img):
    """HWC PIL -> CHW uint8 tensor (what the training cache stores)."""
    return TF.pil_to_tensor(img)


def normalize(batch_uint8):
    """uint8 CHW (or NCHW) -> float, ImageNet-normalized."""
    x = batch_uint8.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def eval_transform(img_size):
    """RGB PIL image -> normalized float tensor, deterministic."""
    return lambda img: normalize(to_uint8_tensor(resize(img, img_size)))


def train_augment(img_size):
    """uint8 CHW tensor (already resized to img_size) -> augmented uint8 tensor.

    Mild random-resized crop (keeps most of the animal), flip and colour jitter.
    """
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])

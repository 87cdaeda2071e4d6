"""TorchServe handler shared by every Dogs-vs-Cats model, and the one definition of how an
image becomes the model's input (training, prediction and serving all import it from here).

Everything the handler needs is in the four files the original README's archiver command
packs: the model file, the state_dict, this file and index_to_name.json. The input size
comes from the weights themselves (the model's `img_size` buffer); the meta JSON that
deployment/archive.sh adds is only a fallback for models without that buffer.

Two engines run the network: an ONNX model (the serialized file is a .onnx, what
deployment/archive.sh packs by default) runs in ONNX Runtime, several times faster than
PyTorch eager on a CPU for these models; a state_dict (.pth, the original README's command)
runs in PyTorch. Both take the same preprocessed batch and give the same probabilities
(checked to 1e-4 when the ONNX file is exported).

The answer is the top label and its probability, e.g. `{"dog": 0.8020902276039124}`, for a
model of any number of classes; the k best, best first, when the request's X-Top-K header or
the model config's handler.topk asks for them. The class names travel in the weights (see
pick_labels for the order that decides them). Each request in a batch gets its own status: a
bad image answers 4xx with a JSON error and the other requests of the batch are answered normally.

TorchServe's entry point is the module-level handle(data, context) below (TorchServe calls it
once with data None to initialize, then once per batch); with one, a handler file may define
several classes. It imports nothing from TorchServe and runs on the stock TorchServe image
too (Python 3.9, torch 2.4): keep to 3.9 syntax and import nothing from the project. The
pillow-heif plugin (HEIC) is optional: where it is missing, a HEIC upload is a 415 that says so.
"""
import base64
import binascii
import http
import importlib
import inspect
import io
import json
import logging
import os
import re
import time

import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The formats phones save: AVIF through Pillow's own plugin (where this Pillow was built with it),
# HEIC/HEIF (iPhones' default) through the pillow-heif plugin, an optional import: the stock
# TorchServe image (Python 3.9) has no pillow-heif, nor an AVIF Pillow if its Pillow predates 11.2,
# and where one is missing such an upload is a 415 that says what to install (HEIF_MISSING,
# AVIF_MISSING: why it is not decoded here, None when it is). libheif applies the file's
# rotation itself and pillow-heif then resets the EXIF orientation to 1; Pillow's AVIF plugin
# leaves the pixels as stored and puts the rotation in the EXIF orientation. exif_transpose in
# open_rgb turns both upright exactly once, like a JPEG.
try:
    import pillow_heif
    pillow_heif.register_heif_opener()
    HEIF_MISSING = None
except Exception as exc:  # not installed, or its compiled part did not load: only HEIC is refused
    HEIF_MISSING = "HEIC/HEIF images need the pillow-heif package (pip install pillow-heif)"
    if not (isinstance(exc, ImportError) and getattr(exc, "name", None) == "pillow_heif"):
        HEIF_MISSING += ", which failed to load here: %s" % exc
try:
    from PIL import AvifImagePlugin  # Pillow 11.2+; its wheels decode AVIF since 11.3
    AVIF_MISSING = None if AvifImagePlugin.SUPPORTED else "this Pillow was built without AVIF"
except ImportError:
    AVIF_MISSING = "this Pillow has no AVIF plugin"
if AVIF_MISSING:
    AVIF_MISSING = "AVIF images need a Pillow with AVIF support (pip install -U pillow): " + AVIF_MISSING
# The only decoders an image ever reaches: the raster formats photos and screenshots come in.
# Pillow is told to try these alone (Image.open(..., formats=...)), so no other plugin parses
# a byte of the input: EPS would hand it to Ghostscript, and the rarer plugins (PSD, ICNS,
# FITS, SPIDER, ...) are attack surface no pet photo needs. Anything else is 415. AVIF comes
# before HEIF: both plugins take files of the generic "mif1" brand, and libheif here has no
# AV1 decoder. A format whose decoder is missing is left out (Pillow fails on a name it lacks).
ACCEPTED_FORMATS = (("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF") + (() if AVIF_MISSING else ("AVIF",))
                    + (() if HEIF_MISSING else ("HEIF",)))
# Pixel limits, read from the header before any pixel is decoded. A JPEG is decoded at 1/2,
# 1/4 or 1/8 scale when the caller says what size it needs (draft mode, see open_rgb), so
# its cost grows little with its size: 40 MP is above any phone photo (12 MP is the usual;
# 48-50 MP sensors save 12 MP by default) and far below what a decompression bomb claims.
MAX_IMAGE_PIXELS = 40_000_000
DRAFT_FORMATS = ("JPEG", "MPO")  # MPO: the multi-picture JPEGs some cameras write
# Every other format is decoded in full before it can be resized, at ~13-30 ms per megapixel
# for a PNG on one core (measured): a 6000x6000 PNG, a few hundred KB when flat, held a worker
# 0.5-1.2 s. 4096x4096 (16.8 MP) still takes a 12 MP phone photo (4032x3024) and 4K (8.3 MP)
# or 5K (14.7 MP) screenshots. A photographic PNG needs 2-3 bytes per pixel, so within the
# 10 MiB upload limit it stays under ~5 MP anyway: a bigger claim is a flat graphic or a bomb.
# AVIF and HEIC are decoded in full too (both plugins parse only the header on open), at ~9-20
# (AVIF) and ~35-80 (HEIC) ms per megapixel for a photo (measured, one core): the same limit.
# It refuses the 24 MP HEIC (5712x4284) that iPhones since the 15 save by default; their 12 MP
# setting, and a JPEG of any size up to 40 MP, pass.
MAX_FULL_DECODE_PIXELS = 4096 * 4096
# Draft mode keeps both sides at least DRAFT_FACTOR x the model's input side, so the final
# resize still averages 2x2 or more source pixels per output pixel. It only ever divides by
# 2, 4 or 8, so the 200x200 Kaggle images are decoded as before at any input side over 50 px.
DRAFT_FACTOR = 2
# Used only when neither the weights, the meta JSON nor the model config give a size.
FALLBACK_IMG_SIZE = 224
# Smaller images carry nothing to classify (a 1x1 pixel is a colour, not a pet);
# override with handler.min_image_side in the model config.
MIN_IMAGE_SIDE = 16
JSON = "application/json"
HOW_TO_SEND = "send the image bytes as the request body (curl -T img.jpg) or as the multipart field 'data'"

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated upload is an error, not grey pixels


# ---- decoding and preprocessing --------------------------------------------------------------

class ImageError(ValueError):
    """Input that cannot be classified: the message says why; its HTTP status and type travel with it."""

    def __init__(self, message, code=400, error_type="InvalidImage"):
        super().__init__(message)
        self.message, self.code, self.error_type = message, code, error_type


def open_rgb(source, img_size=None):
    """Decode a path, bytes or file object into an upright RGB PIL image.

    Handles what cameras and editors produce: EXIF orientation, grayscale,
    16-bit, palette, CMYK and images with alpha (composited onto white, the
    colour a transparent background shows in a browser). Raises ImageError;
    a path that cannot be opened raises the OSError (a file problem, not the image's).

    img_size: the side the caller resizes the image to. Given, a big JPEG is decoded
    at reduced scale (draft mode), which bounds the cost of a 40 MP upload to that of a
    small one. Training, prediction and serving all pass their model's input side, so
    the three decode the very same pixels.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return open_rgb(f, img_size)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("empty input: no image bytes received", 400, "EmptyBody")
        source = io.BytesIO(source)
    try:
        img = Image.open(source, formats=ACCEPTED_FORMATS)
        _check_pixels(img)
        if img_size:
            # A JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose sides stay >= the
            # size asked for, at a fraction of the cost; a HEIC decodes instead an embedded thumbnail
            # that big, if it has one (rotated like the image); other formats ignore it.
            img.draft("RGB", (DRAFT_FACTOR * img_size, DRAFT_FACTOR * img_size))
        img.load()
        img = ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("image too large: %s" % exc, 413, "ImageTooLarge")
    except Image.UnidentifiedImageError:
        # No accepted decoder recognises the bytes: another format (EPS, PSD, ...), not an image at
        # all, or a header too damaged to tell. Saying which would mean parsing them; only a HEIC or
        # AVIF file whose decoder is not installed here is named, from its first box.
        raise ImageError(_missing_decoder(source) or "unsupported image format: the accepted formats are %s"
                         " and %s (or its header is damaged)" % (", ".join(_FORMAT_NAMES[:-1]), _FORMAT_NAMES[-1]),
                         415, "UnsupportedImageFormat")
    except (OSError, SyntaxError, ValueError, RuntimeError) as exc:  # RuntimeError: libavif's, libheif's
        raise ImageError("cannot decode image: %s" % (str(exc).strip() or type(exc).__name__))
    return to_rgb(img)


_FORMAT_NAMES = tuple("HEIF/HEIC" if name == "HEIF" else name for name in ACCEPTED_FORMATS)
# An ISO BMFF file opens with an "ftyp" box: a major brand, a version, then compatible brands.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")
_AVIF_BRANDS = (b"avif", b"avis")


def _missing_decoder(source):
    """What to install to decode `source`, a HEIC or AVIF file this Python cannot decode; else None."""
    try:
        source.seek(0)  # where Image.open reads from too
        head = source.read(64)
    except (AttributeError, OSError, ValueError):
        return None
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    end = min(len(head), int.from_bytes(head[:4], "big"))
    brands = [head[8:12]] + [head[i:i + 4] for i in range(16, end - 3, 4)]  # the major brand first
    for brand in brands:
        if brand in _AVIF_BRANDS:
            return AVIF_MISSING
        if brand in _HEIF_BRANDS:
            return HEIF_MISSING
    return None


def _check_pixels(img):
    """ImageTooLarge, from the header alone, above the limit of the image's format (see MAX_FULL_DECODE_PIXELS)."""
    width, height = img.size
    if img.format in DRAFT_FORMATS:
        limit, limits = MAX_IMAGE_PIXELS, "%d for JPEG" % MAX_IMAGE_PIXELS
    else:
        limit, limits = MAX_FULL_DECODE_PIXELS, "%d for %s, %d for JPEG" % (MAX_FULL_DECODE_PIXELS, img.format,
                                                                         MAX_IMAGE_PIXELS)
    if width * height > limit:
        raise ImageError("image too large: %dx%d is %d pixels (limit %s)" % (width, height, width * height, limits),
                         413, "ImageTooLarge")


def to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    if img.mode == "F":
        # 32-bit float grayscale (scientific and HDR exports): 0..1 is the usual range, some
        # writers keep 0..255 or 0..65535. Scale by the range the values fit in; a plain
        # convert() would truncate 0..1 to black.
        low, high = img.getextrema()
        scale = 255.0 if high <= 1.0 else 1.0 if high <= 255.0 else 255.0 / 65535.0
        return img.point(lambda v: v * scale).convert("L").convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit / 32-bit integer grayscale: scale to 8 bits instead of clipping to white
        img = ImageOps.autocontrast(img.convert("I").point(lambda v: v / 256).convert("L"))
    return img.convert("RGB")


def resize(img, img_size):
    """Squash to img_size x img_size: the whole animal stays in view (no centre crop)."""
    return img.resize((img_size, img_size), Image.BILINEAR, reducing_gap=None)


def to_uint8_tensor(img):
    """RGB PIL image -> CHW uint8 tensor (what the training cache stores)."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(
        2, 0, 1).contiguous()


def normalize(batch_uint8):
    """uint8 CHW (or NCHW) -> float, ImageNet-normalized."""
    x = batch_uint8.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean) / std


def eval_transform(img_size):
    """RGB PIL image -> normalized float tensor, deterministic."""
    return lambda img: normalize(to_uint8_tensor(resize(img, img_size)))


# ---- engines: a preprocessed batch -> logits ------------------------------------------------------

ENGINES = ("onnx", "torch")
ONNX_RUNTIME_MISSING = ("ONNX Runtime is not installed in this Python (pip install onnxruntime); "
                        "or use the torch engine: a .pth checkpoint, --backend torch")


def torch_engine(model, device="cpu"):
    """`model` as a function: normalized float N x 3 x S x S batch -> float32 CPU logits."""
    device = torch.device(device)
    # channels_last, as in training: 1.1-2x faster convolutions on CPU, the same numbers.
    model = model.to(device).to(memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def run(batch):
        return model(batch.to(device).contiguous(memory_format=torch.channels_last)).float().cpu()
    return run


def onnx_session(path, threads=0, spin=True):
    """An ONNX Runtime CPU session; `threads` intra-op threads (0: one per physical core).

    spin: whether idle intra-op threads busy-wait for the next operator (ONNX Runtime's default:
    the lowest latency when the session has the cores to itself). Off, they sleep: better when
    more threads than cores share the machine (several workers), where a spinning thread takes
    the core another worker needs.
    """
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError(ONNX_RUNTIME_MISSING) from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads or 0))
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1  # one graph at a time: parallelism is within each operator
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_engine(session):
    """An ONNX Runtime session as a function: normalized float batch (torch) -> float32 logits (torch)."""
    name = session.get_inputs()[0].name

    def run(batch):
        return torch.from_numpy(session.run(None, {name: batch.contiguous().numpy()})[0])
    return run


def onnx_classes(session):
    """The class names an export of this project records in its metadata (comma-separated), or None."""
    names = session.get_modelmeta().custom_metadata_map.get("classes")
    return names.split(",") if names else None


def onnx_img_size(session):
    """The input side an exported model was fixed to (its height and width axes are static)."""
    side = session.get_inputs()[0].shape[-1]
    return side if isinstance(side, int) else None


# ---- loading -----------------------------------------------------------------------------------

def _normalized(name):
    return name.replace("_", "").replace("-", "").lower()


def pick_model_class(module, hints=()):
    """The one nn.Module class of a model file, or the one named after the file/network.

    A model file may define building blocks too (EfficientNet-Lite0's MBConvBlock), so
    when there are several, take the one whose name matches the file (or conv_net)
    ignoring case and underscores: efficientnet_lite0.py -> EfficientNetLite0.
    """
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__ and issubclass(c, nn.Module)]
    if len(classes) == 1:
        return classes[0]
    wanted = {_normalized(h) for h in (module.__name__,) + tuple(hints) if h}
    named = [c for c in classes if _normalized(c.__name__) in wanted]
    if len(named) == 1:
        return named[0]
    raise ValueError("%s defines nn.Module classes %s; expected one, or one named after the file"
                     % (module.__name__, sorted(c.__name__ for c in classes)))


def pick_img_size(model_config=None, weights=None, meta_json=None, fallback=FALLBACK_IMG_SIZE):
    """(side, where it came from) of the images a model is fed, the first of, in this order:

      1. the model config's handler.img_size (an archive's deliberate override; the server only);
      2. the weights: their img_size buffer, or an ONNX export's fixed input side (what training set);
      3. the meta JSON's img_size (models without the buffer);
      4. the fallback: the registry's serving size (eval_img_size) in the project, FALLBACK_IMG_SIZE
         in an archive, which cannot read the registry.

    The one order: the handler, prediction, evaluation and export all call this."""
    for source, value in (("the model config", model_config), ("the weights", weights),
                          ("the meta JSON", meta_json), ("the fallback", fallback)):
        if value:
            return int(value), source
    raise ValueError("no image size")


def pick_labels(weights=None, meta_classes=None, index_to_name=None, outputs=None):
    """(names of a model's outputs in order, where they came from, warnings): the first of, in this order,

      1. the weights: the class names training stored in them (a state_dict's "_extra_state", an ONNX
         export's "classes" metadata);
      2. the meta JSON's classes (what training recorded beside the weights);
      3. an index_to_name.json mapping (the archive's, or the one beside a checkpoint);
      4. the numbers "0", "1", ... of the model's `outputs`.

    Training writes the three alike; they disagree when files of different models are put together, e.g.
    a three-class model archived with the original README's command, which packs models/index_to_name.json
    (cat, dog). The weights win, being what the model learnt: each source that names other labels, or a
    number of labels other than the model's outputs, adds a warning, which the handler logs and its describe
    answer lists. The one order: the handler, prediction, evaluation and export all call this."""
    sources = []
    for source, value in (("the weights", weights), ("the meta JSON", meta_classes),
                          ("index_to_name.json", index_to_name)):
        if isinstance(value, dict):  # {"0": "cat", "1": "dog"}
            try:
                value = [value[k] for k in sorted(value, key=int)] if value else None
            except (TypeError, ValueError):
                value = ["(keys that are not numbers)"]
        if value:
            sources.append((source, [str(v) for v in value]))
    if not sources:
        return [str(i) for i in range(outputs or 0)], "the output numbers", []
    (source, names), warnings = sources[0], []
    if outputs and len(names) != outputs:
        warnings.append("%s names %d classes for the model's %d outputs" % (source, len(names), outputs))
    for other, other_names in sources[1:]:
        if other_names != names:
            warnings.append("%s lists %s, unlike %s (%s), whose names answer" % (other, other_names, source, names))
    return names, source, warnings


def pick_topk(header=None, model_config=None, classes=2):
    """How many classes an answer names: the request's X-Top-K header, else the model config's handler.topk,
    else 1 (the original's {"dog": 0.97}); at most the number of classes. A header that is not a whole
    number from 1 up is the caller's mistake: ImageError 400."""
    for source, value in (("the X-Top-K header", header), ("handler.topk", model_config)):
        if value is None or value == "":
            continue
        try:
            k = int(str(value).strip())
        except ValueError:
            k = 0
        if k < 1:
            raise ImageError("%s must be a whole number of classes from 1 up, not %r" % (source, str(value)[:40]),
                             400, "InvalidTopK")
        return min(k, classes)
    return 1


def _read_json(path, what):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s %s (%s); ignoring it", what, path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def preprocess_image(data, img_size, transform, min_image_side=MIN_IMAGE_SIDE):
    """An uploaded image's bytes -> the model's normalized CHW input, as every server answers it: decoded by
    open_rgb, refused when a side is under `min_image_side`, then `transform` (eval_transform(img_size)).
    Raises ImageError with the message, HTTP status and type an answer carries (no object reprs in them)."""
    try:
        img = open_rgb(data, img_size)
    except ImageError as exc:
        exc.message = re.sub(r"\s*<[^<>]*>", "", exc.message)
        exc.args = (exc.message,)
        raise
    width, height = img.size
    if min(width, height) < min_image_side:
        raise ImageError("image too small: %dx%d pixels (each side must be at least %d)"
                         % (width, height, min_image_side), 400, "ImageTooSmall")
    return transform(img)


def _set_status(context, idx, code):
    # The reason phrase is the standard one: the details go in the JSON body, never in the status line.
    if hasattr(context, "set_response_status"):
        context.set_response_status(code, http.HTTPStatus(code).phrase, idx)


def _set_json(context, idx):
    try:
        context.set_response_content_type(idx, JSON)
    except (AttributeError, TypeError, IndexError):
        pass  # contexts without request processors


def _header(context, name, idx=0):
    """Request `idx`'s header `name`, whatever case the client spelt it in; None when absent."""
    try:
        headers = context.request_processor[idx].get_request_properties() or {}
    except (AttributeError, TypeError, IndexError, KeyError):
        return None
    wanted = name.lower()
    return next((v for k, v in headers.items() if str(k).lower() == wanted), None)


def _error_body(context, idx, code, error_type, message):
    _set_status(context, idx, code)
    _set_json(context, idx)
    return json.dumps({"code": code, "type": error_type, "message": message})


def _payload(row):
    """The image bytes of one request: raw body (curl -T), multipart field `data`, or base64."""
    if not isinstance(row, dict):
        raise ImageError("unexpected request format", 400, "InvalidInput")
    files = sorted(str(k)[:40] for k, v in row.items() if isinstance(v, (bytes, bytearray)) and len(v))
    if len(files) > 1:  # several multipart files under different names: which one would be answered?
        raise ImageError("one image per request, got %d files (fields %s)" % (len(files), files[:5]),
                         400, "TooManyFiles")
    image = row.get("data")
    if image is None:
        image = row.get("body")
    if image is None or (hasattr(image, "__len__") and len(image) == 0):
        fields = [str(k)[:40] for k in row if k not in ("data", "body")]
        if fields:  # e.g. curl --data-binary with curl's default form content type
            raise ImageError("no image in the request (got form fields %s); %s" % (fields[:5], HOW_TO_SEND),
                             400, "InvalidInput")
        raise ImageError("empty request: no image bytes received; " + HOW_TO_SEND, 400, "EmptyBody")
    if isinstance(image, str):  # text/* bodies arrive decoded; accept base64 text
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("text body is not base64-encoded image bytes")
    if not isinstance(image, (bytes, bytearray)):
        raise ImageError("expected image bytes, got %s (JSON bodies are not accepted); %s"
                         % (type(image).__name__, HOW_TO_SEND), 400, "InvalidInput")
    return bytes(image)


# ---- the handler -------------------------------------------------------------------------------

class DogsVsCatsHandler(object):
    """TorchServe's handler protocol: initialize(context) once per worker, handle(rows, context) per batch."""

    def __init__(self):
        self.engine, self.run, self.model = None, None, None  # self.model: the network, torch engine only
        self.device, self.meta, self.labels, self.label_warnings = torch.device("cpu"), {}, {}, []
        self.topk = None  # the model config's handler.topk
        self.img_size, self.min_image_side, self.transform = FALLBACK_IMG_SIZE, MIN_IMAGE_SIDE, None
        self.initialized = False

    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties.get("model_dir") or "."
        manifest_model = (getattr(context, "manifest", None) or {}).get("model", {})
        handler_config = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}

        # Intra-op threads of the engine, per worker (keep workers x threads <= cores); 0: its default.
        threads = int(handler_config.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)  # also what preprocessing's few tensor operations use
        gpu_id = properties.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device("cuda:%s" % gpu_id)

        serialized = manifest_model.get("serializedFile")
        stem = os.path.splitext(os.path.basename(serialized or ""))[0]
        self.meta = _read_json(os.path.join(model_dir, stem + ".json"), "meta JSON") if serialized else {}
        index_to_name = _read_json(os.path.join(model_dir, "index_to_name.json"), "label mapping")
        if serialized and serialized.endswith(".onnx"):
            session = onnx_session(os.path.join(model_dir, serialized), threads,
                                   spin=bool(handler_config.get("spin", True)))
            self.engine, self.run, weights_size = "onnx", onnx_engine(session), onnx_img_size(session)
            weights_classes = onnx_classes(session)
            outputs = session.get_outputs()[0].shape[-1]
        else:
            state = self._read_weights(model_dir, serialized)
            weights_classes = ((state or {}).get("_extra_state") or {}).get("classes")
            # The head's width: the weights' classes, else the meta JSON's or the mapping's, else the model's own.
            outputs = len(weights_classes or self.meta.get("classes") or index_to_name or ()) or None
            model = self._load_model(model_dir, manifest_model.get("modelFile"), state, outputs)
            buffer = getattr(model, "img_size", None)
            weights_size = int(buffer) if isinstance(buffer, torch.Tensor) else None
            self.engine, self.run, self.model = "torch", torch_engine(model, self.device), model

        self.img_size, source = pick_img_size(handler_config.get("img_size"), weights_size, self.meta.get("img_size"))
        if source == "the fallback":
            logger.warning("no img_size in the weights, the meta JSON or the model config; using %d",
                           FALLBACK_IMG_SIZE)
        self.min_image_side = int(handler_config.get("min_image_side") or MIN_IMAGE_SIDE)
        self.transform = eval_transform(self.img_size)
        outputs = outputs if isinstance(outputs, int) else None  # a symbolic axis (a name, not a number): unknown
        names, label_source, self.label_warnings = pick_labels(weights_classes, self.meta.get("classes"),
                                                               index_to_name, outputs)
        for warning in self.label_warnings:
            logger.warning("labels: %s", warning)
        self.labels = dict(enumerate(names))
        self.topk = pick_topk(None, handler_config.get("topk"), len(self.labels))
        self.initialized = True
        logger.info("%s ready: %s engine, img_size=%d (from %s), labels=%s (from %s), threads=%d",
                    self.meta.get("conv_net") or manifest_model.get("modelName"), self.engine, self.img_size,
                    source, names, label_source, threads or torch.get_num_threads())

    @staticmethod
    def _read_weights(model_dir, serialized):
        """A plain state_dict (tensors and plain values only: weights_only, never pickled code), or None."""
        if not serialized:
            return None
        return torch.load(os.path.join(model_dir, serialized), map_location="cpu", weights_only=True)

    def _load_model(self, model_dir, model_file, state, outputs=None):
        """Build the model file's network, with `outputs` outputs when known, and load the state_dict into it."""
        if not model_file or not os.path.isfile(os.path.join(model_dir, model_file)):
            raise RuntimeError("model file %s is missing from the archive" % model_file)
        module = importlib.import_module(os.path.splitext(os.path.basename(model_file))[0])
        cls = pick_model_class(module, hints=(self.meta.get("conv_net"),))
        model = cls(num_classes=outputs) if outputs else cls()
        if state is not None:
            model.load_state_dict(state)
        return model

    def preprocess_one(self, row):
        """One request -> normalized CHW tensor; a bad one raises ImageError saying why."""
        return preprocess_image(_payload(row), self.img_size, self.transform, self.min_image_side)

    def inference(self, batch):
        return self.run(batch)

    def postprocess(self, logits, topk=None):
        """Logits -> one JSON answer per row: {"label": probability} of its top class (the original's answer),
        or of its k best, best first, where topk[row] says k."""
        probs, order = F.softmax(logits.float(), dim=1).sort(dim=1, descending=True)
        topk = topk or [1] * len(probs)
        return [json.dumps({self.labels.get(i, str(i)): p for i, p in zip(idx[:k], prob[:k])})
                for idx, prob, k in zip(order.tolist(), probs.tolist(), topk)]

    def describe(self):
        return json.dumps({"conv_net": self.meta.get("conv_net"), "engine": self.engine,
                           "img_size": self.img_size,
                           "classes": [self.labels[i] for i in sorted(self.labels)],
                           "topk": self.topk, "label_warnings": self.label_warnings,
                           "min_image_side": self.min_image_side})

    def handle(self, data, context):
        """One answer per request, in order; a bad request fails alone with its own 4xx."""
        start = time.time()
        if _header(context, "describe") == "True":
            return [self.describe() for _ in data]
        explain = _header(context, "explain") == "True"

        responses, tensors, positions, topk = [None] * len(data), [], [], []
        for idx, row in enumerate(data):
            try:
                if explain:
                    raise ImageError("explanations are not served by this model", 501, "NotImplemented")
                k = pick_topk(_header(context, "X-Top-K", idx), self.topk, len(self.labels))
                tensors.append(self.preprocess_one(row))
                positions.append(idx)
                topk.append(k)
            except ImageError as exc:
                responses[idx] = _error_body(context, idx, exc.code, exc.error_type, exc.message)
            except Exception:  # a decoder bug must not take the rest of the batch down
                logger.exception("request %d of the batch failed in preprocessing", idx)
                responses[idx] = _error_body(context, idx, 500, "InternalServerError",
                                             "the image could not be processed")

        if tensors:
            for idx, answer in zip(positions, self.postprocess(self.inference(torch.stack(tensors)), topk)):
                responses[idx] = answer
                _set_status(context, idx, 200)
                _set_json(context, idx)

        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return responses


# ---- TorchServe's entry point ------------------------------------------------------------------

_service = DogsVsCatsHandler()  # one per worker process: TorchServe imports this file once per worker


def handle(data, context):
    """TorchServe calls this with data None once, when the worker loads the model, then once per batch."""
    if not _service.initialized:
        _service.initialize(context)
    return None if data is None else _service.handle(data, context)

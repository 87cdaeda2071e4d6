"""TorchServe handler shared by every Dogs-vs-Cats model.

The network is whatever `--model-file` the archive holds; this handler only
decodes, preprocesses (with the project's own `transforms.py`, shipped in the
archive), runs the batch and answers each request with its top label and
probability, e.g. `{"dog": 0.8020902276039124}`.

Each request in a batch gets its own status: a bad image answers 4xx with a
JSON error and the other requests in the batch are answered normally.

Runs on the stock TorchServe image too (Python 3.9, torch 2.4, torchvision
0.19): keep to 3.9 syntax and import nothing from the project except the files
shipped in the archive.
"""
import base64
import binascii
import http
import importlib
import json
import logging
import os
import re
import time

import torch
import torch.nn.functional as F
from torch import nn
from ts.torch_handler.image_classifier import ImageClassifier
from ts.utils.util import PredictionException, list_classes_from_module

try:  # in the repository (unit tests, tools)
    from models.transforms import ImageDecodeError, eval_transform, open_rgb
except ImportError:  # inside the .mar: transforms.py sits next to this file
    from transforms import ImageDecodeError, eval_transform, open_rgb

logger = logging.getLogger(__name__)

# Used only when the archive carries no meta JSON and the model config names no
# handler.img_size: the ImageNet resolution every model here accepts.
FALLBACK_IMG_SIZE = 224
# Smaller images carry nothing to classify (a 1x1 pixel is a colour, not a pet);
# override with handler.min_image_side in the model config.
MIN_IMAGE_SIDE = 16
JSON = "application/json"
HOW_TO_SEND = "send the image bytes as the request body (curl -T img.jpg) or as the multipart field 'data'"


def request_error(code, error_type, message):
    """The exception that fails one request with HTTP `code` (TorchServe's own exception type:
    the handler file must define exactly one class, the handler)."""
    exc = PredictionException(message, code)
    exc.error_type = error_type
    return exc


def _normalized(name):
    return name.replace("_", "").replace("-", "").lower()


def pick_model_class(module, hints=()):
    """The one nn.Module class of a model file, or the one named after the file/network.

    TorchServe's own loader insists on exactly one class per file; a model file
    may define building blocks too (EfficientNet-Lite0's MBConvBlock), so when
    there are several, take the one whose name matches the file (or conv_net)
    ignoring case and underscores: efficientnet_lite0.py -> EfficientNetLite0.
    """
    classes = [c for c in list_classes_from_module(module) if issubclass(c, nn.Module)]
    if len(classes) == 1:
        return classes[0]
    wanted = {_normalized(h) for h in (module.__name__,) + tuple(hints) if h}
    named = [c for c in classes if _normalized(c.__name__) in wanted]
    if len(named) == 1:
        return named[0]
    raise ValueError("%s defines nn.Module classes %s; expected one, or one named after the file"
                     % (module.__name__, sorted(c.__name__ for c in classes)))


def _set_status(context, idx, code):
    # TorchServe's Context has per-request status; unit-test mocks may not. The reason
    # phrase is the standard one: the details go in the JSON body, never in the status line.
    if hasattr(context, "set_response_status"):
        context.set_response_status(code, http.HTTPStatus(code).phrase, idx)


def _set_json(context, idx):
    try:
        context.set_response_content_type(idx, JSON)
    except (AttributeError, TypeError, IndexError):
        pass  # mocks without request processors


class DogsVsCatsHandler(ImageClassifier):
    """ImageClassifier with the project's preprocessing, top-1 answers and per-request errors."""

    topk = 1

    def __init__(self):
        super().__init__()
        self.meta = {}
        self.img_size = FALLBACK_IMG_SIZE
        self.min_image_side = MIN_IMAGE_SIDE
        self.transform = None
        self.labels = {}

    # ---- loading -------------------------------------------------------------------------

    def initialize(self, context):
        properties = context.system_properties
        model_dir = properties.get("model_dir") or "."
        handler_config = (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}

        threads = int(handler_config.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)

        self.meta = self._read_meta(model_dir, context.manifest)
        super().initialize(context)  # device, model (via _load_pickled_model), label mapping
        # channels_last, as in training and predict_main.py: 1.1-2x faster convolutions on CPU.
        self.model = self.model.to(memory_format=torch.channels_last)

        img_size = self.meta.get("img_size") or handler_config.get("img_size")
        if not img_size:
            logger.warning("no img_size in the checkpoint's meta JSON or the model config; using %d",
                           FALLBACK_IMG_SIZE)
        self.img_size = int(img_size or FALLBACK_IMG_SIZE)
        self.min_image_side = int(handler_config.get("min_image_side") or MIN_IMAGE_SIDE)
        self.transform = eval_transform(self.img_size)
        self.labels = self._labels()
        logger.info("%s ready: img_size=%d, labels=%s, torch threads=%d",
                    self.meta.get("conv_net") or context.manifest.get("model", {}).get("modelName"),
                    self.img_size, self.labels, torch.get_num_threads())

    @staticmethod
    def _read_meta(model_dir, manifest):
        """The meta JSON named after the serialized file (model_x.pth -> model_x.json), or {}."""
        serialized = (manifest or {}).get("model", {}).get("serializedFile")
        if not serialized:
            return {}
        path = os.path.join(model_dir, os.path.splitext(os.path.basename(serialized))[0] + ".json")
        if not os.path.isfile(path):
            logger.warning("no meta JSON %s in the archive", os.path.basename(path))
            return {}
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            logger.warning("cannot read %s (%s); ignoring it", path, exc)
            return {}
        return meta if isinstance(meta, dict) else {}

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        """Build the model file's network and load a plain state_dict (tensors only, no pickled code)."""
        if not os.path.isfile(os.path.join(model_dir, model_file)):
            raise RuntimeError("model file %s is missing from the archive" % model_file)
        module_name = os.path.splitext(os.path.basename(model_file))[0]
        module = importlib.import_module(module_name)
        model = pick_model_class(module, hints=(self.meta.get("conv_net"),))()
        if model_pt_path:
            state_dict = torch.load(model_pt_path, map_location="cpu", weights_only=True)
            model.load_state_dict(state_dict)
        return model

    def _labels(self):
        if self.mapping:
            return {int(k): v for k, v in self.mapping.items()}
        classes = self.meta.get("classes")
        if classes:
            return dict(enumerate(classes))
        return {}

    # ---- one request -----------------------------------------------------------------------

    @staticmethod
    def _payload(row):
        """The image bytes of one request: raw body (curl -T), multipart field `data`, or base64."""
        if not isinstance(row, dict):
            raise request_error(400, "InvalidInput", "unexpected request format")
        image = row.get("data")
        if image is None:
            image = row.get("body")
        if image is None or (hasattr(image, "__len__") and len(image) == 0):
            fields = [str(k)[:40] for k in row if k not in ("data", "body")]
            if fields:  # e.g. curl --data-binary with curl's default form content type
                raise request_error(400, "InvalidInput", "no image in the request (got form fields %s); %s"
                                    % (fields[:5], HOW_TO_SEND))
            raise request_error(400, "EmptyBody", "empty request: no image bytes received; " + HOW_TO_SEND)
        if isinstance(image, str):  # text/* bodies arrive decoded; accept base64 text
            try:
                image = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise request_error(400, "InvalidImage", "text body is not base64-encoded image bytes")
        if not isinstance(image, (bytes, bytearray)):
            raise request_error(400, "InvalidInput", "expected image bytes, got %s (JSON bodies are not "
                                "accepted); %s" % (type(image).__name__, HOW_TO_SEND))
        return bytes(image)

    def preprocess_one(self, row):
        """One request -> normalized CHW tensor; a bad one raises request_error(...) saying why."""
        try:
            img = open_rgb(self._payload(row))
        except ImageDecodeError as exc:
            message = re.sub(r"\s*<[^<>]*>", "", str(exc))  # no object reprs in answers
            if message.startswith("image too large"):
                raise request_error(413, "ImageTooLarge", message)
            raise request_error(400, "InvalidImage", message)
        width, height = img.size
        if min(width, height) < self.min_image_side:
            raise request_error(400, "ImageTooSmall", "image too small: %dx%d pixels (each side must be at "
                                                     "least %d)" % (width, height, self.min_image_side))
        return self.transform(img)

    # ---- the stock hooks, batch-wide ---------------------------------------------------------

    def preprocess(self, data):
        """Stock signature: every row must be good (handle() is the per-request path)."""
        return self._batch([self.preprocess_one(row) for row in data])

    def _batch(self, tensors):
        return torch.stack(tensors).to(self.device).contiguous(memory_format=torch.channels_last)

    def postprocess(self, data):
        """Logits -> one JSON answer per row: {"label": probability of the top class}."""
        probs = F.softmax(data.float(), dim=1)
        top_prob, top_idx = probs.max(dim=1)
        return [json.dumps({self.labels.get(i, str(i)): p})
                for i, p in zip(top_idx.tolist(), top_prob.tolist())]

    def describe_handle(self):
        return json.dumps({"conv_net": self.meta.get("conv_net"), "img_size": self.img_size,
                           "classes": [self.labels[i] for i in sorted(self.labels)],
                           "min_image_side": self.min_image_side})

    # ---- entry point ---------------------------------------------------------------------------

    def _header(self, context, name):
        try:
            return context.get_request_header(0, name)
        except (AttributeError, TypeError, IndexError, KeyError):
            return None

    def handle(self, data, context):
        """One answer per request, in order; a bad request fails alone with its own 4xx."""
        start = time.time()
        self.context = context
        responses = [None] * len(data)

        if self._header(context, "describe") == "True":
            return [self.describe_handle() for _ in data]
        explain = self._header(context, "explain") == "True"

        tensors, positions = [], []
        for idx, row in enumerate(data):
            try:
                if explain:
                    raise request_error(501, "NotImplemented", "explanations are not served by this model")
                tensors.append(self.preprocess_one(row))
                positions.append(idx)
            except PredictionException as exc:
                responses[idx] = self._error(context, idx, exc.error_code,
                                             getattr(exc, "error_type", "InvalidInput"), exc.message)
            except Exception:  # a decoder bug must not take the rest of the batch down
                logger.exception("request %d of the batch failed in preprocessing", idx)
                responses[idx] = self._error(context, idx, 500, "InternalServerError",
                                             "the image could not be processed")

        if tensors:
            logits = self.inference(self._batch(tensors))
            for idx, answer in zip(positions, self.postprocess(logits)):
                responses[idx] = answer
                _set_status(context, idx, 200)
                _set_json(context, idx)

        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        return responses

    @staticmethod
    def _error(context, idx, code, error_type, message):
        _set_status(context, idx, code)
        _set_json(context, idx)
        return json.dumps({"code": code, "type": error_type, "message": message})

"""The shipped classifiers behind KServe's ModelServer: the Open Inference Protocol v2 over REST and gRPC.

    python -m serving.kserve_server [--models NAME ...] [--model NAME=CHECKPOINT ...] [--host 127.0.0.1]
                                    [--http-port 8090] [--grpc-port 8091] [--threads N] [--model-control]

A maintained server beside TorchServe 0.12 (archived upstream). It serves the same models with the same
decode, preprocessing and ONNX export: models.transforms.preprocess_image (the TorchServe handler's own
function) and the export beside each checkpoint (models.inference, as predict_main.py's onnx backend runs
it), so its numbers are predict_main.py's and TorchServe's. Default models: models.shipped_models() with
their shipped weights, each served under its registry name; `--model NAME=CHECKPOINT` serves other weights
of the network NAME. Ports 8090 (REST) and 8091 (gRPC): TorchServe keeps 8080-8082 and 7070-7071.

Protocol, per model NAME (POST /v2/models/NAME/infer, gRPC ModelInfer; GET /v2/models/NAME or gRPC
ModelMetadata describes it):
  input   "image"          BYTES [N]          one encoded image (JPEG, PNG, WebP, HEIC, AVIF, ...) per
                                              element, 1 <= N <= MAX_BATCH; the N images are one forward pass
  outputs "probabilities"  FP32  [N, classes] softmax, in the order of the model's classes
          "label"          BYTES [N]          the top class of each image
The image bytes may travel as: REST JSON, each element a base64 string (JSON has no bytes; base64 is the
convention); REST with the binary data extension (Inference-Header-Content-Length, raw bytes after the
JSON header: tritonclient's binary_data=True); gRPC bytes_contents or raw_input_contents.

Binary BYTES over REST: kserve 0.21's InferRequest.from_bytes turns every binary BYTES tensor into JSON
strings (InferInput.set_data_from_numpy(..., binary_data=False) decodes each element as UTF-8), so any
JPEG fails there with InferenceError: HTTP 500, with the whole image's repr in the message. ImageDataPlane
overrides the one method that calls it (decode_inference_request) to read the request the same way but
keep the raw bytes on the InferInput (its as_numpy() deserializes them as kserve's gRPC path does); it
also refuses malformed framing with a 400 instead of a KeyError/500, and takes a body without the header
as all JSON, as the binary data extension says. Nothing else of the request's path changes.

Errors: a request this server refuses raises RequestError (a kserve InvalidInput) with the HTTP status of
models.handler's ImageError where there is one (415 not an image we decode, e.g. EPS; 413 decompression
bomb; 400 too small) and 400 otherwise (wrong datatype, shape, number of inputs, not base64, empty, more
than MAX_BATCH images). REST answers {"error": message, "code": status, "type": kind} with that status
(an exception handler registered on kserve's FastAPI app); gRPC answers INVALID_ARGUMENT with the message,
as kserve's interceptor does for any InvalidInput (the one here logs a line instead of a traceback). A
message about one image names its index in the batch. Nothing answers with a traceback.

Body size limit: MAX_REQUEST_SIZE, TorchServe's max_request_size read from deployment/config.properties
(10 MiB), on both protocols. REST: _BodyLimit, an ASGI middleware on kserve's FastAPI app, answers 413
JSON to a Content-Length over the limit before reading the body, and counts the bytes of a body sent
without one (chunked). gRPC: grpc.max_receive_message_length (a larger message gets RESOURCE_EXHAUSTED
from gRPC itself).

Loopback: kserve 0.21 hard-codes 0.0.0.0 for uvicorn and [::] for gRPC. LoopbackModelServer listens on
--host (default 127.0.0.1) for both: it sets the REST server's uvicorn config host after kserve builds it
and before it serves, and runs LoopbackGRPCServer, kserve's GRPCServer with the listen address as a parameter.
Expose it through a reverse proxy, as TorchServe (docs/serving.md).

Readiness: every model is loaded before the server opens its ports (a model that cannot be loaded is one
line on stderr and exit status 2). GET /v2/health/ready (gRPC ServerReady) is true only while every model
is loaded; GET /v2/models/NAME/ready (gRPC ModelReady) per model; a model that is not loaded answers 503
(gRPC UNAVAILABLE) to inference.

Model control (kserve's model repository extension), off unless --model-control, as TorchServe's model API
is off here (deployment/config.properties, enable_model_api=false): POST /v2/repository/models/NAME/unload
would let whoever reaches the port take a model down (with --host 0.0.0.0 in a container: the cluster).
Off, load and unload answer 403. On, they are real: unload releases a model's ONNX Runtime session (it
stays listed, not ready), load opens its checkpoint again; only the models given at start, no new paths.
Use REST for them: over gRPC, kserve 0.21's RepositoryModelLoad and RepositoryModelUnload do the work, then
answer INTERNAL (they index the None its extension returns), and tritonclient's requests reach them without
a model name (Triton's proto numbers that field differently).

Importing this module imports neither kserve nor torch: the constants and the command line's helpers are
for a runner too. kserve's generated gRPC module and tritonclient.grpc's register the same protobuf names
(inference.*) in the process's descriptor pool, so a process can import only one of the two; everything
built on kserve is defined by kserve_api() on first use (ImageClassifier, LoopbackModelServer and
RequestError are also reachable as attributes of this module, which calls it).
"""
import argparse
import functools
import json
import os
import sys
import types

from serving.torchserve import REPO_ROOT, SHIPPED_CONFIG, read_properties

DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8090
DEFAULT_GRPC_PORT = 8091
# ONNX Runtime threads per forward pass. Requests run side by side in kserve's thread pool, so one core each
# keeps every core busy under load without oversubscribing them: at 16 clients, efficientnet_lite0 answered
# 101.9 req/s with 1 against 92.1 with every core per request (bench/kserve.py, docs/benchmarks.md), as
# TorchServe's shipped config runs 2 workers of 1 thread. A single client waits longer per image with 1.
DEFAULT_THREADS = 1
# Images in one request, all run as one batch: a client with more sends several requests.
MAX_BATCH = 32
# The largest request body (REST) or message (gRPC), in bytes: TorchServe's limit, so the two servers
# take the same uploads. A later key wins in config.properties, as in TorchServe.
MAX_REQUEST_SIZE = int(dict(read_properties(SHIPPED_CONFIG))["max_request_size"])
INPUT_NAME = "image"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LABEL = "label"


def _error_json(message, code, error_type):
    """The body of every refusal, REST: kserve's {"error": ...} with the status and its kind."""
    return {"error": message, "code": code, "type": error_type}


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 JSON and never reaches kserve.

    A Content-Length over the limit is refused before a byte of the body is read. A body without one
    (chunked) is read here, counting, and refused as soon as it passes the limit; one within it is handed
    on whole (kserve reads every body whole anyway)."""

    def __init__(self, app, limit):
        self.app, self.limit = app, limit

    @staticmethod
    async def _refuse(send, size, limit):
        body = json.dumps(_error_json("the request body (%s bytes) is larger than the limit, %d bytes; send fewer "
                                      "or smaller images" % (size, limit), 413, "RequestTooLarge")).encode()
        # Connection: close: the rest of the body is never read, so this connection cannot carry another request.
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit():
            if int(length) > self.limit:
                return await self._refuse(send, int(length), self.limit)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send, "%d or more" % size, self.limit)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, replay, send)


def __getattr__(name):
    """ImageClassifier, LoopbackModelServer, RequestError: defined with kserve, on first use."""
    if name in ("ImageClassifier", "LoopbackModelServer", "RequestError"):
        return getattr(kserve_api(), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


@functools.lru_cache(maxsize=None)
def kserve_api():
    """Import kserve and define what this server builds on it, once; returns them as a namespace."""
    # kserve.model_server parses sys.argv with its own flags when it is imported (parse_known_args: an
    # abbreviation such as --model is taken for its --model_name); this command line and a caller's are not
    # its own, so it sees none of them.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import asyncio
        import base64
        import binascii
        import struct
        from concurrent import futures

        import kserve
        import numpy as np
        import orjson
        from fastapi.responses import JSONResponse
        from grpc import StatusCode, aio
        from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER, MAX_GRPC_MESSAGE_LENGTH
        from kserve.errors import InvalidInput, ModelNotReady
        from kserve.logging import logger
        from kserve.model_repository import ModelRepository
        from kserve.protocol.dataplane import DataPlane
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
        from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
        from kserve.protocol.grpc.server import GRPCServer
        from kserve.protocol.grpc.servicer import InferenceServicer
        from kserve.protocol.model_repository_extension import ModelRepositoryExtension
        from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse, RequestedOutput
        from kserve.utils.utils import generate_uuid
    finally:
        sys.argv = argv

    class RequestError(InvalidInput):
        """A request this server refuses: `reason` says why, `code` is the HTTP status, `error_type` its kind.
        An InvalidInput, so that wherever kserve's own handling meets it, it is still a 400 / INVALID_ARGUMENT."""

        def __init__(self, reason, code=400, error_type="InvalidInput"):
            super().__init__(reason)
            self.code, self.error_type = code, error_type

    def not_loaded(model_name):
        return ModelNotReady(model_name, "POST /v2/repository/models/%s/load loads it (--model-control)." % model_name)

    async def request_error_handler(_, exc):
        # A refused request is the client's mistake: one log line, no traceback.
        logger.info("refused (%d %s): %s", exc.code, exc.error_type, exc.reason)
        return JSONResponse(status_code=exc.code, content=_error_json(exc.reason, exc.code, exc.error_type))

    # ---- the model ----

    class ImageClassifier(kserve.Model):
        """One trained checkpoint: load() opens it and its ONNX export in ONNX Runtime (predict_main.py's onnx
        backend: models.inference.Predictor, which exports a missing or stale .onnx first); predict() answers a
        BYTES [N] tensor of encoded images with their probabilities and top labels, in one forward pass."""

        def __init__(self, name, checkpoint_path, threads=0):
            super().__init__(name)
            self.checkpoint_path, self.threads = checkpoint_path, threads
            self.predictor = None
            self.classes = None  # kept when unloaded: the metadata still describes the model

        def load(self):
            from models.checkpoint import Checkpoint
            from models.inference import Predictor
            predictor = Predictor(Checkpoint(self.name, self.checkpoint_path), backend="onnx", threads=self.threads)
            predictor.checkpoint.__dict__.pop("model", None)  # only the ONNX session serves: free the torch copy
            self.predictor, self.classes = predictor, list(predictor.classes)
            self.ready = True
            return self.ready

        def start(self):
            # kserve's start() sets ready = True whether or not anything is loaded; readiness here is load()'s.
            pass

        def stop(self):
            """Unload (kserve's repository extension): drop the session; requests in flight keep theirs."""
            self.ready, self.predictor = False, None

        def get_input_types(self):
            return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

        def get_output_types(self):
            return [{"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, len(self.classes or ())]},
                    {"name": OUTPUT_LABEL, "datatype": "BYTES", "shape": [-1]}]

        async def predict(self, payload, headers=None, response_headers=None):
            predictor = self.predictor
            if predictor is None:
                raise not_loaded(self.name)
            if not isinstance(payload, InferRequest):  # kserve's v1 routes hand over the JSON body
                raise RequestError("this server speaks the Open Inference Protocol v2: POST /v2/models/%s/infer"
                                   % self.name)
            images = request_images(payload)
            # Decoding and the forward pass take milliseconds to seconds of CPU: off the event loop, which keeps
            # answering health checks and other requests meanwhile (ONNX Runtime sessions are thread-safe).
            probs = await asyncio.get_running_loop().run_in_executor(None, classify, predictor, images)
            labels = np.array([predictor.classes[i].encode() for i in probs.argmax(axis=1)], dtype=np.object_)
            outputs = [InferOutput(OUTPUT_PROBABILITIES, list(probs.shape), "FP32"),
                       InferOutput(OUTPUT_LABEL, [len(labels)], "BYTES")]
            for output, array in zip(outputs, (probs, labels)):
                # As lists: kserve 0.21's InferResponse.to_grpc() tests `output.data` for truth, which a numpy
                # array refuses (ValueError, gRPC INTERNAL) when the request came as raw_input_contents.
                # to_rest() and to_grpc() turn lists back into numpy, binary or not as the client asked.
                output.set_data_from_numpy(array, binary_data=False)
            return InferResponse(payload.id or generate_uuid(), self.name, outputs,
                                 use_binary_outputs=payload.use_binary_outputs,
                                 requested_outputs=payload.request_outputs)

    def classify(predictor, images):
        """Encoded images -> N x classes float32 probabilities: the handler's preprocessing, one forward pass."""
        import torch
        from models.transforms import ImageError, preprocess_image
        tensors = []
        for index, data in enumerate(images):
            try:
                tensors.append(preprocess_image(data, predictor.img_size, predictor.transform))
            except ImageError as exc:
                raise RequestError(which(index, len(images)) + exc.message, exc.code, exc.error_type) from None
        with torch.inference_mode():
            return predictor.probabilities(torch.stack(tensors)).numpy()

    def which(index, count):
        return "image %d (of %d): " % (index, count)

    def request_images(request):
        """The encoded images of a request: its one BYTES [N] input as N bytes objects, or RequestError."""
        if len(request.inputs) != 1:
            names = ", ".join(repr(str(i.name)[:40]) for i in request.inputs[:5])
            raise RequestError("expected one input, %r (BYTES [N], one encoded image per element), got %d%s"
                               % (INPUT_NAME, len(request.inputs), " (%s)" % names if names else ""))
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise RequestError("unexpected input %r: the input is %r (BYTES [N])" % (str(tensor.name)[:40],
                                                                                     INPUT_NAME))
        if tensor.datatype != "BYTES":
            raise RequestError("input %r must be BYTES (encoded images), not %s"
                               % (INPUT_NAME, str(tensor.datatype)[:20]))
        shape = list(tensor.shape)
        if len(shape) != 1:
            raise RequestError("input %r must have shape [N] (one encoded image per element), not %s"
                               % (INPUT_NAME, shape[:8]))
        count = shape[0]
        if count < 1:
            raise RequestError("input %r is empty (shape %s): send at least one image" % (INPUT_NAME, shape))
        if count > MAX_BATCH:
            raise RequestError("%d images in one request: at most %d (MAX_BATCH); send several requests"
                               % (count, MAX_BATCH))
        try:
            elements = tensor.as_numpy()  # raw bytes (binary REST, gRPC raw) are deserialized here
        except (ValueError, TypeError, struct.error) as exc:
            raise RequestError("the data of input %r do not fit its shape %s (%s)"
                               % (INPUT_NAME, shape, str(exc)[:100]))
        images = []
        for index, element in enumerate(elements.reshape(-1).tolist()):
            if isinstance(element, str):  # REST JSON: base64, the convention for bytes in JSON
                try:
                    element = base64.b64decode(element, validate=True)
                except (binascii.Error, ValueError):
                    raise RequestError(which(index, count) + "not base64: in JSON each element of %r is the "
                                       "base64 of an encoded image (or send binary data)" % INPUT_NAME) from None
            elif not isinstance(element, (bytes, bytearray)):
                raise RequestError(which(index, count) + "expected an encoded image (base64 in JSON), got %s"
                                   % type(element).__name__)
            images.append(bytes(element))
        return images

    # ---- kserve, adapted ----

    class Repository(ModelRepository):
        """The models given at start, listed whether loaded or not (kserve's deletes a model it unloads, whose
        readiness then reads "not found" rather than false); load() opens a listed model's checkpoint again."""

        def __init__(self, models):
            super().__init__()
            for model in models:
                self.update(model)

        async def load(self, name):
            model = self.get_model(name)
            if model is None:
                raise KeyError("no model %s (the models are: %s)" % (name, ", ".join(sorted(self.models))))
            if not model.ready:
                await asyncio.get_running_loop().run_in_executor(None, model.load)
            return model.ready

        def unload(self, name):
            if name not in self.models:
                raise KeyError(name)
            self.models[name].stop()

    class ModelControl(ModelRepositoryExtension):
        """kserve's model repository extension (load/unload), refused with 403 unless `enabled`."""

        def __init__(self, model_registry, enabled):
            super().__init__(model_registry)
            self.enabled = enabled

        def _check(self, name):
            if not self.enabled:
                raise RequestError("model control is off: this server cannot load or unload %s (start it with "
                                   "--model-control to allow it)" % str(name)[:40], 403, "ModelControlDisabled")

        async def load(self, model_name):
            self._check(model_name)
            return await super().load(model_name)

        async def unload(self, model_name):
            self._check(model_name)
            return await super().unload(model_name)

    class ImageDataPlane(DataPlane):
        """kserve's DataPlane with three corrections: server readiness means every model is loaded (kserve's is
        always true); inference on a model that is not loaded is refused (kserve's gRPC path would load it
        inside the request); binary REST requests keep BYTES as bytes (see the module docstring)."""

        async def ready(self):
            models = self.model_registry.get_models()
            return (await super().ready() and bool(models)
                    and all([await self.model_registry.is_model_ready(name) for name in models]))

        async def get_model(self, name):
            model = self.get_model_from_registry(name)
            if not await self.model_registry.is_model_ready(name):
                raise not_loaded(name)
            return model

        def decode_inference_request(self, body, headers, model_name):
            if not isinstance(body, (bytes, bytearray)):
                return super().decode_inference_request(body, headers, model_name)
            return binary_request(bytes(body), headers, model_name)

    def binary_request(body, headers, model_name):
        """kserve's InferRequest.from_bytes without its UTF-8 decoding of binary tensors: each binary input keeps
        its bytes (InferInput.as_numpy() deserializes them, as for gRPC raw_input_contents)."""
        declared = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        try:
            json_length = len(body) if declared is None else int(declared)  # no header: all of it is JSON
        except ValueError:
            json_length = -1
        if not 0 < json_length <= len(body):
            raise RequestError("the Inference-Header-Content-Length header must be the length of the JSON at the "
                               "start of the body (1 to %d), not %r" % (len(body), str(declared)[:20]))
        try:
            header = orjson.loads(body[:json_length])
        except orjson.JSONDecodeError as exc:
            hint = ""
            if declared is None and body[:1] not in (b"{", b"[", b" ", b"\n"):  # e.g. curl -T img.jpg, as TorchServe
                hint = ('; this server speaks the Open Inference Protocol: POST {"inputs": [{"name": "image", '
                        '"datatype": "BYTES", "shape": [1], "data": ["<the image, base64>"]}]} (README, "Serving '
                        'without TorchServe")')
            raise RequestError("the request's JSON cannot be parsed: %s%s" % (str(exc)[:200], hint))
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            raise RequestError('the request\'s JSON must be an object with a list "inputs"')
        inputs, raw, offset = [], [], json_length
        for spec in header["inputs"]:
            if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                    and isinstance(spec.get("datatype"), str) and isinstance(spec.get("shape"), list)
                    and all(type(d) is int for d in spec["shape"])):
                raise RequestError('each input needs "name", "datatype" and "shape" (a list of whole numbers)')
            parameters = spec.get("parameters") if isinstance(spec.get("parameters"), dict) else None
            inputs.append(InferInput(spec["name"], spec["shape"], spec["datatype"], data=spec.get("data"),
                                     parameters=parameters))
            size = (parameters or {}).get("binary_data_size")
            if spec.get("data") is not None:
                raw.append(None)
            elif type(size) is int and 0 <= size <= len(body) - offset:
                raw.append(body[offset:offset + size])
                offset += size
            else:
                raise RequestError("input %r has neither \"data\" nor a binary_data_size within the %d bytes after "
                                   "the JSON" % (spec["name"][:40], len(body) - offset))
        if offset != len(body):
            raise RequestError("%d bytes after the binary data the inputs declare" % (len(body) - offset))
        outputs = header.get("outputs")
        requested = [RequestedOutput(o["name"], o.get("parameters")) for o in outputs
                     if isinstance(o, dict) and isinstance(o.get("name"), str)] if isinstance(outputs, list) else None
        return InferRequest(model_name, inputs, request_id=header.get("id"), parameters=header.get("parameters"),
                            raw_inputs=raw if any(r is not None for r in raw) else None,
                            request_outputs=requested or None)

    class Interceptor(ExceptionToStatusInterceptor):
        """kserve's exception-to-status interceptor, with two corrections: a refused request is one log line, not
        a traceback (it is the client's mistake), INVALID_ARGUMENT (PERMISSION_DENIED for model control that is
        off); ModelNotReady answers UNAVAILABLE with its message (kserve's
        reads a `reason` that ModelNotReady does not have: the call would end in an AttributeError instead)."""

        async def handle_exception(self, ex, request_or_iterator, context, method_name):
            if isinstance(ex, RequestError):
                logger.info("refused %s (%d %s): %s", method_name, ex.code, ex.error_type, ex.reason)
                status = StatusCode.PERMISSION_DENIED if ex.code == 403 else StatusCode.INVALID_ARGUMENT
                await context.abort(status, ex.reason)
            elif isinstance(ex, ModelNotReady):
                await context.abort(StatusCode.UNAVAILABLE, str(ex))
            else:
                await super().handle_exception(ex, request_or_iterator, context, method_name)

    class LoopbackGRPCServer(GRPCServer):
        """kserve's GRPCServer listening on `host`: its start() with the address its own hard-codes as [::] (every
        interface) made a parameter, and Interceptor in place of its exception interceptor."""

        def __init__(self, host, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._host = host

        async def start(self, max_workers):
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), Interceptor()),
                options=[("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length"))])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
            address = "%s:%d" % ("[%s]" % self._host if ":" in self._host else self._host, self._port)
            if not self._server.add_insecure_port(address):
                raise RuntimeError("cannot listen on %s" % address)
            logger.info("Starting gRPC server on %s", address)
            await self._server.start()
            await self._server.wait_for_termination()

    class LoopbackModelServer(kserve.ModelServer):
        """kserve's ModelServer on `host` (REST and gRPC), with this module's readiness, body limit, errors and
        model control.

        kserve builds its REST server inside start() with host 0.0.0.0; setup_event_loop() is what start() calls
        after that and before anything serves, so the host is set there. Its gRPC server cannot be told an
        address: kserve's is turned off (enable_grpc=False) and LoopbackGRPCServer runs in its place, in the same
        event loop, stopped by kserve's stop() as its own would be."""

        def __init__(self, models, host=DEFAULT_HOST, http_port=DEFAULT_HTTP_PORT, grpc_port=DEFAULT_GRPC_PORT,
                     model_control=False, max_threads=4, enable_grpc=True):
            super().__init__(http_port=http_port, grpc_port=grpc_port, workers=1, max_threads=max_threads,
                             enable_grpc=False, registered_models=Repository(models), enable_docs_url=False,
                             enable_latency_logging=False)
            self.host, self.serve_grpc, self.served_models = host, enable_grpc, list(models)
            # Both are handed to the REST and gRPC servers that start() builds: replacing kserve's here is enough.
            self.dataplane = ImageDataPlane(model_registry=self.registered_models)
            self.model_repository_extension = ModelControl(self.registered_models, model_control)

        def setup_event_loop(self):
            if self._rest_server is None:
                raise RuntimeError("kserve's ModelServer.start() no longer builds its REST server before "
                                   "setup_event_loop(): serving/kserve_server.py cannot set its host")
            self._rest_server.config.host = self.host
            super().setup_event_loop()

        def start(self, models=None):
            from kserve.model_server import app  # kserve's one FastAPI app: its REST server serves it
            app.add_middleware(_BodyLimit, limit=MAX_REQUEST_SIZE)
            # Starlette picks the handler of the exception's most specific class: this one, not InvalidInput's
            app.add_exception_handler(RequestError, request_error_handler)
            if self.serve_grpc:
                self._grpc_server = LoopbackGRPCServer(
                    self.host, self.grpc_port, self.dataplane, self.model_repository_extension,
                    kwargs={"grpc_max_send_message_length": MAX_GRPC_MESSAGE_LENGTH,
                            "grpc_max_receive_message_length": MAX_REQUEST_SIZE},
                    grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start(self.max_threads))
            super().start(self.served_models if models is None else models)

    for cls in (RequestError, ImageClassifier, LoopbackModelServer):
        cls.__qualname__ = cls.__name__  # serving.kserve_server.ImageClassifier, as if defined at the top level
    return types.SimpleNamespace(RequestError=RequestError, ImageClassifier=ImageClassifier,
                                 LoopbackModelServer=LoopbackModelServer)


# ---- the command line ---------------------------------------------------------------------------

def model_specs(names=None, pairs=None):
    """[(registry name, checkpoint path)] of --models and --model NAME=CHECKPOINT: --models' names with their
    shipped weights, then each --model (which replaces the same name's); neither: models.shipped_models().
    Raises ValueError with a one-line reason."""
    from models import MODELS, shipped_models, weights_path
    specs = {name: None for name in (names or ([] if pairs else shipped_models()))}
    for pair in pairs or ():
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ValueError("--model takes NAME=CHECKPOINT, not %r" % pair)
        specs[name] = os.path.abspath(path)
    unknown = [name for name in specs if name not in MODELS]
    if unknown:
        raise ValueError("unknown model %s: the models are %s" % (", ".join(unknown), ", ".join(sorted(MODELS))))
    specs = {name: path or os.path.join(REPO_ROOT, weights_path(name)) for name, path in specs.items()}
    if not specs:
        raise ValueError("no models: none has shipped weights (models/NAME/model_NAME.pth); pass --model "
                         "NAME=CHECKPOINT")
    return sorted(specs.items())


def _check_port(host, port, flag):
    """A clear error now rather than a traceback from uvicorn or gRPC once the models are loaded."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and gRPC bind
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError("cannot listen on %s port %d (%s): %s" % (host, port, flag, exc.strerror or exc))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m serving.kserve_server",
                                     description="Serve the classifiers with KServe (Open Inference Protocol v2).")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="registry names to serve with their shipped weights (default: every shipped model)")
    parser.add_argument("--model", action="append", metavar="NAME=CHECKPOINT",
                        help="serve the network NAME with these weights (repeatable)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address both servers listen on (default %(default)s: this machine only)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT, help="REST port (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (default %(default)s)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="ONNX Runtime intra-op threads of each request's forward pass (default %(default)s: "
                             "concurrent requests run side by side, one core each; 0: every core for each)")
    parser.add_argument("--model-control", action="store_true",
                        help="allow POST /v2/repository/models/NAME/unload and .../load (off: 403, since whoever "
                             "reaches the port could take a model down)")
    return parser.parse_args(argv)


def _fail(message):
    print("error: %s" % message, file=sys.stderr)
    return 2


def main(argv=None):
    args = parse_args(argv)
    try:
        specs = model_specs(args.models, args.model)
        _check_port(args.host, args.http_port, "--http-port")
        _check_port(args.host, args.grpc_port, "--grpc-port")
    except ValueError as exc:
        return _fail(exc)
    from models.checkpoint import CheckpointError, one_line
    api = kserve_api()
    models = []
    for name, path in specs:
        model = api.ImageClassifier(name, path, threads=args.threads)
        try:
            model.load()
        except CheckpointError as exc:
            return _fail("cannot load model %s: %s" % (name, exc))
        except Exception as exc:  # anything else: still one line, not a traceback
            return _fail("cannot load model %s from %s: %s" % (name, path, one_line(exc)))
        models.append(model)
    api.LoopbackModelServer(models, args.host, args.http_port, args.grpc_port, args.model_control).start()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference: an image (path or bytes) -> the one decode and preprocessing -> an engine -> probabilities.

predict_main.py, evaluate_main.py and bench/ use this module; the TorchServe handler runs the
same decode, preprocessing and engines (they are defined in models/handler.py, which an
archive must carry alone).

Engines ("backends"):
  onnx   ONNX Runtime on an ONNX export of the checkpoint: the default wherever onnxruntime
         is installed. On a 2-core AVX2 CPU it runs EfficientNet-Lite0 about 4x faster than
         PyTorch eager (docs/benchmarks.md).
  torch  PyTorch eager on the checkpoint itself: the reference, the fallback, and the engine
         for CUDA.

The ONNX file lives beside its checkpoint (models/base_cnn/model_base_cnn.onnx) and records
the SHA-256 of the weights it was exported from. A missing or stale one is exported again,
and every export is checked against PyTorch on real images: probabilities within 1e-4, or
the export fails.
"""
import contextlib
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import SAMPLE_IMAGES
from models.checkpoint import Checkpoint, CheckpointError, atomic_write_bytes
from models.transforms import (ENGINES, IMAGE_EXTENSIONS, ONNX_RUNTIME_MISSING, decode_file, eval_transform, onnx_engine,
                               onnx_img_size, onnx_session, open_rgb, torch_engine)

BACKENDS = ENGINES  # ("onnx", "torch")
EXPORT_ATOL = 1e-4  # largest allowed difference of any probability between ONNX Runtime and torch
OPSET = 18


class ExportError(RuntimeError):
    """An ONNX export failed or does not compute what the checkpoint computes."""


def onnx_available():
    try:
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def default_backend():
    """onnx where ONNX Runtime is installed, else torch."""
    return "onnx" if onnx_available() else "torch"


def onnx_metadata(session):
    return dict(session.get_modelmeta().custom_metadata_map)


def current_onnx(checkpoint, threads=0):
    """An ONNX Runtime session on the export beside `checkpoint` (a models.checkpoint.Checkpoint) when it was
    made from these very weights, else None (missing, stale, or unreadable)."""
    path = checkpoint.onnx_path
    if not os.path.isfile(path):
        return None
    if not onnx_available():
        raise RuntimeError(ONNX_RUNTIME_MISSING)
    try:
        session = onnx_session(path, threads)
    except Exception:  # a damaged or foreign file: export again
        return None
    if onnx_metadata(session).get("source_sha256") != checkpoint.sha256:
        return None
    return session


# ---- export ----------------------------------------------------------------------------------

def sample_batch(img_size, folder=SAMPLE_IMAGES, limit=32):
    """Preprocessed real images from `folder` (recursively), at most `limit`, as one batch."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)[:limit]
    if not paths:
        raise ExportError("no images in %s to check the export on" % folder)
    transform = eval_transform(img_size)
    return torch.stack([transform(open_rgb(p, img_size)) for p in paths])


def _drop_stack_traces(proto):
    """Remove the Python stack trace the exporter records on each node: it names the absolute path of the
    checkout the export ran in, so two checkouts of the same weights and code would write different files.
    Without it an export is a function of the weights and the code alone (tests/test_shipped.py rebuilds
    the shipped ones byte for byte); the rest of the nodes' metadata (module and FX names) stays."""
    def graphs(graph):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    yield from graphs(attr.g)
                for sub in attr.graphs:
                    yield from graphs(sub)
    for container in list(graphs(proto.graph)) + list(proto.functions):
        for node in container.node:
            kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            if len(kept) != len(node.metadata_props):
                del node.metadata_props[:]
                node.metadata_props.extend(kept)


def export_onnx(checkpoint, out_path=None, check_images=SAMPLE_IMAGES, atol=EXPORT_ATOL):
    """Export `checkpoint` (a models.checkpoint.Checkpoint) to ONNX (dynamic batch axis, fixed image side),
    check it, write it atomically.

    The check runs ONNX Runtime and torch on real images, one at a time and as one batch:
    any probability differing by more than `atol` raises ExportError and nothing is written.
    Returns (path written, largest difference seen).
    """
    path, worst, _ = _export(checkpoint, out_path or checkpoint.onnx_path, check_images, atol)
    return path, worst


def _export(checkpoint, out_path, check_images, atol, threads=0):
    """export_onnx, also returning the ONNX Runtime session the export was checked with (`threads` threads)."""
    model, img_size = checkpoint.model, checkpoint.img_size
    batch = sample_batch(img_size, check_images)
    dim = torch.export.Dim("batch", min=1, max=4096)
    quiet = io.StringIO()
    try:
        # The exporter prints its progress and warnings; they are shown only when it fails.
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            program = torch.onnx.export(model, (batch[:2],), input_names=["image"], output_names=["logits"],
                                        dynamic_shapes=({0: dim},), opset_version=OPSET, dynamo=True,
                                        external_data=False, verbose=False)
            program.optimize()
    except Exception as exc:
        raise ExportError("exporting %s to ONNX failed: %s\n%s" % (checkpoint.path, exc, quiet.getvalue()[-2000:]))
    proto = program.model_proto
    _drop_stack_traces(proto)
    for key, value in (("conv_net", checkpoint.conv_net), ("img_size", str(img_size)),
                       ("classes", ",".join(checkpoint.classes)),
                       ("source", os.path.basename(checkpoint.path)), ("source_sha256", checkpoint.sha256),
                       ("torch", torch.__version__)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()

    session = onnx_session(data, threads)
    run = onnx_engine(session)
    with torch.inference_mode():
        expected = F.softmax(model(batch), dim=1)
    got_batch = F.softmax(run(batch), dim=1)
    got_single = torch.cat([F.softmax(run(batch[i:i + 1]), dim=1) for i in range(len(batch))])
    worst = max(float((got_batch - expected).abs().max()), float((got_single - expected).abs().max()))
    if not worst <= atol:  # also catches NaN
        raise ExportError("the ONNX export of %s differs from torch by %.2g on %d real images (limit %.0e)"
                          % (checkpoint.path, worst, len(batch), atol))
    atomic_write_bytes(data, out_path)
    return out_path, worst, session


def ensure_onnx(checkpoint, threads=0, log=None):
    """A session on an up-to-date ONNX export of `checkpoint`: the one beside it, or a fresh export (whose
    session is the one it was checked with: the weights are loaded, hashed and run once).

    A fresh export goes beside the checkpoint, or to a temporary folder when that one is not
    writable; either way a line on `log` says so.
    """
    log = log or sys.stderr
    session = current_onnx(checkpoint, threads)
    if session is not None:
        return session, checkpoint.onnx_path
    target = checkpoint.onnx_path
    if not os.access(os.path.dirname(os.path.abspath(target)), os.W_OK):
        target = os.path.join(tempfile.mkdtemp(prefix="onnx-"), os.path.basename(target))
    start = time.time()
    print("exporting %s to ONNX (%s is missing or older than the weights) ..." % (checkpoint.path, target), file=log)
    path, worst, session = _export(checkpoint, target, SAMPLE_IMAGES, EXPORT_ATOL, threads)
    print("wrote %s in %.0f s (largest probability difference from torch: %.1e)" % (path, time.time() - start, worst),
          file=log)
    return session, path


# ---- prediction --------------------------------------------------------------------------------

class Predictor:
    """A trained model (a models.checkpoint.Checkpoint) behind one engine, with its size and classes."""

    def __init__(self, checkpoint, backend=None, threads=0, device="cpu"):
        backend = backend or default_backend()
        if backend not in BACKENDS:
            raise ValueError("backend must be one of %s, not %r" % (BACKENDS, backend))
        if backend == "onnx" and torch.device(device).type != "cpu":
            raise CheckpointError("the onnx backend runs on the CPU here; use --backend torch for %s" % device)
        if threads:
            torch.set_num_threads(threads)
        self.checkpoint, self.meta, self.classes = checkpoint, checkpoint.meta, checkpoint.classes
        for warning in checkpoint.label_warnings:
            print("warning: %s: labels: %s" % (checkpoint.path, warning), file=sys.stderr)
        self.conv_net, self.model_path = checkpoint.conv_net, checkpoint.path
        self.backend, self.device = backend, device
        self.img_size = checkpoint.img_size  # loads the weights: a checkpoint that does not fit conv_net fails here
        if backend == "onnx":
            try:
                session, self.onnx_path = ensure_onnx(checkpoint, threads)
            except ImportError as exc:  # onnxscript/onnx, needed only to export
                raise CheckpointError("cannot export %s to ONNX: %s (pip install -r requirements.txt, "
                                      "or use --backend torch)" % (checkpoint.path, exc))
            except (ExportError, RuntimeError) as exc:
                raise CheckpointError(str(exc).splitlines()[0])
            exported = onnx_img_size(session)
            if exported != self.img_size:
                raise CheckpointError("%s takes %s px images, the checkpoint %d px" % (self.onnx_path, exported,
                                                                                       self.img_size))
            self.run = onnx_engine(session)
        else:
            self.run = torch_engine(checkpoint.model, device)
        self.transform = eval_transform(self.img_size)

    @classmethod
    def open(cls, conv_net, model_path, backend=None, threads=0, device="cpu"):
        """Predictor(Checkpoint(conv_net, model_path), ...): for a caller that has not opened it."""
        return cls(Checkpoint(conv_net, model_path), backend, threads, device)

    def probabilities(self, batch):
        """Normalized N x 3 x S x S batch -> N x classes softmax probabilities (float32, CPU)."""
        return F.softmax(self.run(batch), dim=1)

    def preprocess(self, source):
        """A path, bytes or file object -> the model's input tensor (raises ImageError, OSError)."""
        return self.transform(open_rgb(source, self.img_size))

    def classify(self, source):
        """Probabilities (a list, in the order of self.classes) of one image."""
        return self.probabilities(self.preprocess(source).unsqueeze(0))[0].tolist()

    def decode(self, path):
        """(model input tensor, None), or (None, why) for a file that is not an image we can read."""
        return decode_file(path, self.img_size, self.transform)

    def predict_files(self, paths, batch_size=32, num_workers=2, desc="predicting"):
        """[(path, probabilities as a list, or None)] in the order of `paths`.

        Decoding runs in `num_workers` threads (Pillow and torch release the GIL), one batch
        ahead of the engine. Threads, not processes: nothing goes through /dev/shm, which is
        64 MB in a default Docker container. Files that cannot be decoded are named on stderr
        and get None; they never stop the run.
        """
        batches = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        results = []
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool, \
                tqdm(total=len(paths), desc=desc, unit="img", leave=False, mininterval=1.0, file=sys.stderr) as bar:
            pending = [pool.submit(self.decode, p) for p in batches[0]] if batches else []
            for b, batch in enumerate(batches):
                decoded = [future.result() for future in pending]
                if b + 1 < len(batches):  # the next batch decodes while this one runs
                    pending = [pool.submit(self.decode, p) for p in batches[b + 1]]
                good = [k for k, (tensor, _) in enumerate(decoded) if tensor is not None]
                probs = self.probabilities(torch.stack([decoded[k][0] for k in good])).tolist() if good else []
                by_index = dict(zip(good, probs))
                for k, (path, (_, error)) in enumerate(zip(batch, decoded)):
                    if error is not None:
                        tqdm.write("warning: skipping %s: %s" % (path, error), file=sys.stderr)
                    results.append((path, by_index.get(k)))
                bar.update(len(batch))
        return results

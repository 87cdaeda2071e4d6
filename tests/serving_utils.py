"""Helpers for the serving tests: checkpoints, archives, test images and a real TorchServe.

`TorchServe` is torchserve.TorchServe (the product's runner, which `make serve` uses): the
server started the way the README does (`torchserve --start --ncs --ts-config ...
--model-store ... --models ...`) with a config generated from deployment/config.properties
in a temporary directory: free 127.0.0.1 ports, its own temp dir (TorchServe keeps its pid
file and worker sockets there), its own logs. Every other setting comes from the shipped
config, so the tests exercise the shipped limits. It is a context manager: the server and
its workers are stopped, by PID, even when a test fails.
"""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import requests
from PIL import Image

from serving import torchserve
from serving.torchserve import (ARCHIVE_SH, SHIPPED_CONFIG, VENV_BIN, TorchServeError, free_port,  # noqa: F401
                     read_properties as _read_properties)
from tests.support import FIXTURES, REPO_ROOT, TEST1_DIR, TRAIN_DIR  # noqa: F401 (re-exported to the serving tests)


# ---- checkpoints and archives ---------------------------------------------------------------

def make_checkpoint(directory, conv_net, img_size, seed=0):
    """A randomly initialised `conv_net` saved like training saves it (state_dict + meta JSON)."""
    from models import save_untrained
    return save_untrained(directory, conv_net, img_size, seed)


def write_model_config(path, batch_size=4, max_batch_delay=100, workers=1, response_timeout=60, threads=1):
    with open(path, "w") as f:
        f.write("minWorkers: %d\nmaxWorkers: %d\nbatchSize: %d\nmaxBatchDelay: %d\n"
                "responseTimeout: %d\nstartupTimeout: 300\nhandler:\n  threads: %d\n"
                % (workers, workers, batch_size, max_batch_delay, response_timeout, threads))
    return path


def run_archive(*args, timeout=300):
    """deployment/archive.sh with `args`; returns the CompletedProcess (stdout+stderr in .stdout)."""
    return subprocess.run(["bash", ARCHIVE_SH] + list(args), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable))


def archive(export_path, conv_net, checkpoint, config_file=None, archive_format="default", backend="onnx"):
    args = ["--export-path", export_path, "--archive-format", archive_format, "--backend", backend]
    if config_file:
        args += ["--config-file", config_file]
    result = run_archive(*(args + ["%s=%s" % (conv_net, checkpoint)]))
    if result.returncode != 0:
        raise RuntimeError("archive.sh failed (%d):\n%s" % (result.returncode, result.stdout))
    return os.path.join(export_path, conv_net + ".mar")


# ---- images --------------------------------------------------------------------------------

def fixture_bytes(name, directory=TEST1_DIR):
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def encode(img, fmt, **params):
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side=30000, rows=64):
    """A valid PNG header claiming side x side RGB pixels (900 MP for 30000, 2.7 GB decoded)
    followed by a few KB of compressed rows: what a decompression-bomb upload looks like."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows_data = zlib.compress(b"\0" * ((3 * side + 1) * rows), 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows_data)
            + _png_chunk(b"IEND", b""))


def truncated_jpeg(data):
    return data[: len(data) // 2]


def tiny_png():
    return encode(Image.new("RGB", (1, 1), (200, 120, 40)), "PNG")


def flat_png(side):
    """A real side x side PNG of one colour: issue 17's upload, ~120 KB for 6000 that decode to 108 MB."""
    return encode(Image.new("RGB", (side, side), (120, 80, 40)), "PNG")


def eps_bytes():
    """A minimal EPS file. Pillow's EPS plugin recognises it, and to decode it runs Ghostscript on it."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
            b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


# ---- the server ------------------------------------------------------------------------------
# The runner is product code (serving/torchserve.py: `make serve` and bench/ use it too); the tests import it
# from here.

class TorchServe(torchserve.TorchServe):
    __doc__ = torchserve.TorchServe.__doc__

    def __init__(self, *args, **kwargs):
        # The callers written before the management API moved to a Unix socket (test_serving,
        # test_original_readme, bench/) reach it with requests over HTTP: give them a free
        # loopback port. The shipped setting, the socket, is tested in tests/test_operator.py.
        kwargs.setdefault("management", "http")
        super().__init__(*args, **kwargs)


def post(url, data, timeout=120, session=None):
    return (session or requests).post(url, data=data, timeout=timeout)


def dog_probability(answer):
    """{"dog": p} -> p, {"cat": p} -> 1 - p."""
    (label, prob), = answer.items()
    assert label in ("cat", "dog"), answer
    return prob if label == "dog" else 1.0 - prob


def read_json_response(response):
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    return json.loads(response.text)


_TRAINED = {}


def expected_dog_probabilities(conv_net, checkpoint, images):
    """What the project's own code (models.load_trained + transforms) says for each image's bytes."""
    import torch
    from models import CLASSES, load_trained
    from models.transforms import eval_transform, open_rgb

    key = (conv_net, checkpoint, os.path.getmtime(checkpoint))
    if key not in _TRAINED:
        _TRAINED[key] = load_trained(conv_net, checkpoint)
    model, img_size = _TRAINED[key]
    transform = eval_transform(img_size)
    batch = torch.stack([transform(open_rgb(data, img_size)) for data in images])
    with torch.inference_mode():
        probs = torch.softmax(model(batch), dim=1)
    return probs[:, CLASSES.index("dog")].tolist()

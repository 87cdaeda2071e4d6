"""Helpers for the serving tests: checkpoints, archives, test images and a real TorchServe.

`TorchServe` starts the server the way the README does (`torchserve --start --ncs
--ts-config ... --model-store ... --models ...`) but with a generated config in a
temporary directory: free 127.0.0.1 ports, its own temp dir (TorchServe keeps its
pid file and worker sockets there), its own logs, token authorization off. Every
other setting comes from deployment/config.properties, so the tests exercise the
shipped limits. It is a context manager: the server and its workers are stopped
even when a test fails.
"""
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib

import requests
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_CONFIG = os.path.join(REPO_ROOT, "deployment", "config.properties")
ARCHIVE_SH = os.path.join(REPO_ROOT, "deployment", "archive.sh")
VENV_BIN = os.path.dirname(sys.executable)  # run by the venv's Python: its torchserve and worker Python
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "images")
TEST1_DIR = os.path.join(FIXTURES, "test1")
TRAIN_DIR = os.path.join(FIXTURES, "train")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- checkpoints and archives ---------------------------------------------------------------

def make_checkpoint(directory, conv_net, img_size, seed=0):
    """A randomly initialised `conv_net` saved like training saves it (state_dict + meta JSON)."""
    import torch
    from models import CLASSES, MODELS, build_model, set_serving_size
    from models.checkpoint import save_model

    torch.manual_seed(seed)
    model = build_model(conv_net)
    set_serving_size(model, img_size)
    path = os.path.join(directory, "model_%s.pth" % conv_net)
    save_model(model, {"conv_net": conv_net, "img_size": img_size, "classes": list(CLASSES),
                       "dropout": MODELS[conv_net].dropout}, path)
    return path


def write_model_config(path, batch_size=4, max_batch_delay=100, workers=1, response_timeout=60,
                       torch_threads=1):
    with open(path, "w") as f:
        f.write("minWorkers: %d\nmaxWorkers: %d\nbatchSize: %d\nmaxBatchDelay: %d\n"
                "responseTimeout: %d\nstartupTimeout: 300\nhandler:\n  torch_threads: %d\n"
                % (workers, workers, batch_size, max_batch_delay, response_timeout, torch_threads))
    return path


def run_archive(*args, timeout=300):
    """deployment/archive.sh with `args`; returns the CompletedProcess (stdout+stderr in .stdout)."""
    return subprocess.run(["bash", ARCHIVE_SH] + list(args), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout,
                          env=dict(os.environ, PYTHON=sys.executable))


def archive(export_path, conv_net, checkpoint, config_file=None, archive_format="default"):
    args = ["--export-path", export_path, "--archive-format", archive_format]
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

def _read_properties(path):
    lines = []
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and "=" in stripped:
                key, value = stripped.split("=", 1)
                lines.append((key.strip(), value.strip()))
    return lines


class TorchServeError(RuntimeError):
    pass


class TorchServe(object):
    """One TorchServe on free loopback ports, in its own directory.

    models: {name: archive file name in model_store}; start() returns once every model (or
    those in wait_for) has its minWorkers READY. overrides: config.properties keys to set.
    """

    def __init__(self, workdir, model_store, models, overrides=None, start_timeout=600, wait_for=None):
        self.workdir = workdir
        self.model_store = model_store
        self.models = dict(models)
        self.wait_for = list(self.models if wait_for is None else wait_for)
        self.overrides = dict(overrides or {})
        self.start_timeout = start_timeout
        self.process = None
        self.inference_port = self.management_port = self.metrics_port = None
        self.tmp = os.path.join(workdir, "tmp")
        self.logs = os.path.join(workdir, "logs")
        self.config_path = os.path.join(workdir, "config.properties")
        self.out_path = os.path.join(workdir, "torchserve.out")
        self._known = {}  # pid -> psutil.Process: identity-checked, so a reused pid is never killed

    # -- lifecycle --

    def _write_config(self):
        self.inference_port, self.management_port, self.metrics_port = free_port(), free_port(), free_port()
        settings = dict(_read_properties(SHIPPED_CONFIG))
        settings.update({
            "inference_address": "http://127.0.0.1:%d" % self.inference_port,
            "management_address": "http://127.0.0.1:%d" % self.management_port,
            "metrics_address": "http://127.0.0.1:%d" % self.metrics_port,
            "grpc_inference_address": "127.0.0.1",
            "grpc_management_address": "127.0.0.1",
            "grpc_inference_port": str(free_port()),
            "grpc_management_port": str(free_port()),
            "initial_worker_port": str(free_port()),
            "model_store": self.model_store,
            "disable_token_authorization": "true",
            "enable_model_api": "false",
            "enable_envvars_config": "false",  # nothing in the test environment changes it
        })
        settings.update(self.overrides)
        with open(self.config_path, "w") as f:
            for key, value in settings.items():
                f.write("%s=%s\n" % (key, value))

    def _env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TS_") and k not in ("PYTHONPATH", "TS_CONFIG_FILE")}
        env.update({
            "PATH": VENV_BIN + os.pathsep + env.get("PATH", ""),
            "TEMP": self.tmp,  # java.io.tmpdir: worker sockets
            "TMPDIR": self.tmp,  # the launcher's pid file
            "LOG_LOCATION": self.logs,
            "METRICS_LOCATION": self.logs,
        })
        return env

    def _torchserve(self, *args):
        return [os.path.join(VENV_BIN, "torchserve")] + list(args)

    def start(self):
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self._write_config()
        specs = ["%s=%s" % (name, mar) for name, mar in self.models.items()]
        cmd = self._torchserve("--start", "--ncs", "--foreground", "--ts-config", self.config_path,
                               "--model-store", self.model_store, "--models", *specs)
        with open(self.out_path, "ab") as out:
            self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + self.start_timeout
            for name in self.wait_for:
                self.wait_ready(name, deadline=deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout=60):
        """`torchserve --stop`, then make sure the frontend and every worker it started are gone."""
        if self.process is None:
            return
        self._process_tree()
        try:
            subprocess.run(self._torchserve("--stop"), cwd=self.workdir, env=self._env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        import psutil
        gone, alive = psutil.wait_procs(list(self._known.values()), timeout=20)
        for proc in alive:  # still running after the frontend stopped: ours, so end it
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _process_tree(self):
        """Remember the launcher, the Java frontend and the workers: the processes this server started."""
        import psutil
        if self.process is not None:
            try:
                root = psutil.Process(self.process.pid)
                for proc in [root] + root.children(recursive=True):
                    self._known.setdefault(proc.pid, proc)
            except psutil.Error:
                pass
        return set(self._known)

    # -- URLs and management --

    def url(self, path):
        return "http://127.0.0.1:%d/%s" % (self.inference_port, path.lstrip("/"))

    def management_url(self, path):
        return "http://127.0.0.1:%d/%s" % (self.management_port, path.lstrip("/"))

    def predict_url(self, model):
        return self.url("predictions/" + model)

    def describe(self, model):
        r = requests.get(self.management_url("models/" + model), timeout=10)
        r.raise_for_status()
        return r.json()[0]

    def workers(self, model):
        return self.describe(model).get("workers", [])

    def ready_pids(self, model):
        return [w["pid"] for w in self.workers(model) if w.get("status") == "READY"]

    def wait_ready(self, model, exclude_pids=(), deadline=None, timeout=300):
        """Wait until `model` has minWorkers READY workers (none of them in exclude_pids)."""
        deadline = deadline or time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise TorchServeError("torchserve exited (%s):\n%s" % (self.process.returncode, self.log_tail()))
            try:
                info = self.describe(model)
                ready = [w["pid"] for w in info.get("workers", [])
                         if w.get("status") == "READY" and w.get("pid") not in exclude_pids]
                if ready and len(ready) >= info.get("minWorkers", 1):
                    self._process_tree()
                    return ready
            except (requests.RequestException, ValueError, IndexError):
                pass
            if time.monotonic() > deadline:
                raise TorchServeError("%s not ready in time:\n%s" % (model, self.log_tail()))
            time.sleep(0.5)

    def log_tail(self, lines=60):
        chunks = []
        for path in (self.out_path, os.path.join(self.logs, "model_log.log")):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    chunks.append("==> %s\n%s" % (path, "".join(f.readlines()[-lines:])))
        return "\n".join(chunks)

    def model_log(self):
        path = os.path.join(self.logs, "model_log.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()


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

"""Run the KServe server (serving/kserve_server.py) as a process: start it, wait until every model is ready,
stop it by its PID. What `make serve-kserve` (python -m serving start --server kserve), the tests and the
benchmarks use, as serving/torchserve.py's TorchServe class is for TorchServe.

Readiness is the Open Inference Protocol's own: `GET /v2/health/ready` is 200 only once every model has
loaded, and `GET /v2/models/NAME/ready` says it per model. Like TorchServe's runner, this imports neither
torch nor kserve: the server process does.
"""
import base64
import json
import os
import subprocess
import sys
import time

from deployment import readiness
from serving.torchserve import REPO_ROOT, TorchServeError, _stop_processes, free_port


class KServeServer(object):
    """One KServe ModelServer process on `host`: `http_port`/`grpc_port`, or free ports when None.

    models: the registry names to serve (None: the shipped ones, the server's default); threads: its --threads
    (None: its default). log: where its output goes. start() returns once /v2/health/ready answers 200, or
    raises TorchServeError with the log's last lines (a model that did not load, a port in use)."""

    def __init__(self, log, models=None, host="127.0.0.1", http_port=None, grpc_port=None, threads=None,
                 start_timeout=300, extra_args=()):
        self.log, self.models, self.host = os.path.abspath(log), list(models or []), host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.threads, self.start_timeout, self.extra_args = threads, start_timeout, list(extra_args)
        self.process = None
        self.inference_address = "http://%s:%d" % (host, self.http_port)
        self.grpc_address = "%s:%d" % (host, self.grpc_port)

    def command(self):
        cmd = [sys.executable, "-m", "serving.kserve_server", "--host", self.host,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        if self.models:
            cmd += ["--models"] + self.models
        if self.threads is not None:  # None: the server's default
            cmd += ["--threads", str(self.threads)]
        return cmd + self.extra_args

    def start(self, detach=False):
        os.makedirs(os.path.dirname(self.log), exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command(), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=detach)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def ready(self, model=None):
        """Whether the server (every model), or `model`, answers ready."""
        path = "/v2/models/%s/ready" % model if model else "/v2/health/ready"
        try:
            return readiness.request(self.inference_address, "GET", path, timeout=4)[0] == 200
        except OSError:
            return False

    def wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise TorchServeError("the KServe server exited with status %d: %s"
                                      % (self.process.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise TorchServeError("the KServe server was not ready after %d s: %s"
                                      % (self.start_timeout, self.log_tail()))
            time.sleep(0.2)

    def log_tail(self, lines=5):
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(line.strip() for line in f.read().splitlines()[-lines:] if line.strip())
        except OSError:
            return "(no log)"

    def classify(self, model, image_bytes, timeout=120):
        """(HTTP status, answer) of one image over REST v2 JSON: {"label": probability} of its top class, as
        TorchServe answers, or the server's JSON error."""
        body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(image_bytes).decode("ascii")]}]}
        status, text = readiness.request(self.inference_address, "POST", "/v2/models/%s/infer" % model,
                                         body=json.dumps(body), timeout=timeout,
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(text)
        if status != 200:
            return status, answer
        outputs = {o["name"]: o["data"] for o in answer["outputs"]}
        return status, {outputs["label"][0]: max(outputs["probabilities"])}

    def _process_tree(self):
        import psutil
        if self.process is None:
            return set()
        try:
            root = psutil.Process(self.process.pid)
            return {p.pid for p in [root] + root.children(recursive=True)}
        except psutil.Error:
            return set()

    def stop(self, timeout=30):
        """SIGTERM (the ModelServer's graceful stop), then kill what is left."""
        if self.process is None:
            return
        import psutil
        procs = []
        for pid in self._process_tree():
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
        _stop_processes(procs, timeout)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

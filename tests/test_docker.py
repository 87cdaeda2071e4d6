"""End to end: the Docker image and the stock-image command answer like a local TorchServe.

Slow (a Docker engine, image builds, three TorchServe starts), so it runs only when
asked:  tests/run_docker_test.sh [--rmi | --rmi-all]   (or RUN_DOCKER_TESTS=1 pytest tests/test_docker.py)

What it does, in order:
  1. uses the running Docker engine, or starts one (`dockerd $DOCKERD_ARGS`, default
     --bridge=none) when run as root and none answers; stops it again at the end;
  2. takes the archives of deployment/model-store/ (what deployment/archive.sh built),
     or, when that holds no .mar file, builds base_cnn.mar and efficientnet_lite0.mar
     with deployment/archive.sh from randomly initialised weights (same handler, model
     files, transforms and model configs; only the weights differ);
  3. the base image: $DOCKER_TEST_BASE_IMAGE (e.g. pytorch/torchserve:0.12.0-cpu where
     Docker Hub can be reached), else the local stand-in built (or reused) by
     deployment/standin/build.sh;
  4. classifies sample images with curl against a local TorchServe (this virtualenv)
     serving the same archives;
  5. `docker build` deployment/Dockerfile on the base image, `docker run` it, waits
     for its HEALTHCHECK to say healthy, classifies the same images with curl; runs it
     again with the environment and user of deployment/kubernetes/deployment.yaml and
     runs that Deployment's probes exactly as written (readiness command, /ping, metrics);
  6. runs the original README command on the base image (the stock entrypoint runs
     `torchserve --model-store ... --models ...`, plus --disable-token-auth) and does
     the same;
  7. `docker compose` (or docker-compose) with deployment/docker-compose.yml, when one
     is installed: `config`, then `up -d`, healthy, one answer, `down`;
  8. checks every answer equals the local one (dog probability within
     $DOCKER_TEST_ATOL, default 1e-5), then removes its containers, and with
     DOCKER_TEST_RMI=1 the image it built (=all: the stand-in and rootfs images too).

Ports are free ones on 127.0.0.1. Where the engine has a bridge network the containers
are run with `-p 127.0.0.1:PORT:8080 ...` exactly as docs/docker.md shows; on an engine
without one (dockerd --bridge=none) with `--network host`, the addresses then set to
127.0.0.1 and free ports through TorchServe's TS_* environment variables (project image)
or a mounted copy of the image's config.properties (stock command). Every docker
command run is printed.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import requests
import yaml

from tests.serving_utils import REPO_ROOT, TEST1_DIR, TRAIN_DIR, TorchServe, dog_probability, free_port, \
    make_checkpoint, run_archive
from tests.support import dockerfile_copies, stop_process

pytestmark = pytest.mark.skipif(os.environ.get("RUN_DOCKER_TESTS") != "1",
                                reason="Docker end-to-end test: run tests/run_docker_test.sh "
                                       "(or set RUN_DOCKER_TESTS=1)")

DEPLOYMENT = os.path.join(REPO_ROOT, "deployment")
STANDIN_BUILD = os.path.join(DEPLOYMENT, "standin", "build.sh")
STANDIN_IMAGE = os.environ.get("STANDIN_IMAGE", "dogscats/torchserve-standin:0.12.0-cpu")
STANDIN_ROOTFS_IMAGE = os.environ.get("STANDIN_ROOTFS_IMAGE", "dogscats/debian-rootfs:bookworm")
TEST_IMAGE = os.environ.get("DOCKER_TEST_IMAGE", "dogscats-torchserve:docker-test")
ATOL = float(os.environ.get("DOCKER_TEST_ATOL", "1e-5"))
START_TIMEOUT = float(os.environ.get("DOCKER_TEST_START_TIMEOUT", "300"))
RMI = os.environ.get("DOCKER_TEST_RMI", "")
PREFIX = "dogscats-docker-test-%d" % os.getpid()
IMAGES = [os.path.join(TEST1_DIR, n) for n in sorted(os.listdir(TEST1_DIR))] + \
         [os.path.join(TRAIN_DIR, n) for n in ("cat.0.jpg", "dog.0.jpg")]
TIMINGS = []


def say(msg):
    print("[docker-test] %s" % msg, flush=True)


class timed(object):
    def __init__(self, what):
        self.what = what

    def __enter__(self):
        self.start = time.monotonic()

    def __exit__(self, *exc):
        TIMINGS.append((self.what, time.monotonic() - self.start))
        say("%s: %.1fs" % (self.what, TIMINGS[-1][1]))


def run(cmd, check=True, quiet=False, timeout=1800, **kw):
    """Run and print one command; its output is shown only when it fails (or quiet=False)."""
    say("$ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError("exit %d: %s\n%s" % (proc.returncode, " ".join(cmd), proc.stdout[-6000:]))
    if not quiet and proc.stdout.strip():
        print(proc.stdout.rstrip()[-3000:], flush=True)
    return proc


def docker(*args, **kw):
    return run(["docker"] + list(args), **kw)


def docker_answers():
    return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def image_exists(ref):
    return image_id(ref) is not None


def image_id(ref):
    proc = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, universal_newlines=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def drop_replaced(ref, previous_id):
    """Remove the image `ref` named before a rebuild moved the tag to a new one: otherwise every rerun
    leaves the previous build behind, dangling (`<none>`). One still used elsewhere stays."""
    if previous_id and image_id(ref) != previous_id:
        subprocess.run(["docker", "rmi", previous_id], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def curl_predict(url, image):
    """POST one image with curl, as docs/docker.md does; returns (HTTP status, parsed JSON or text)."""
    proc = subprocess.run(["curl", "-sS", "--max-time", "120", "-w", "\n%{http_code}", "-X", "POST", "-T", image, url],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode != 0:
        raise AssertionError("curl %s -T %s failed: %s" % (url, image, proc.stderr.strip()))
    body, _, code = proc.stdout.rpartition("\n")
    try:
        return int(code), json.loads(body)
    except ValueError:
        return int(code), body


def classify_all(base_url, models, images=IMAGES):
    answers = {}
    for model in models:
        for image in images:
            status, body = curl_predict("%s/predictions/%s" % (base_url, model), image)
            assert status == 200, "%s %s: HTTP %s %s" % (model, os.path.basename(image), status, body)
            answers[(model, os.path.basename(image))] = body
    return answers


def compare(expected, got, where):
    """Every answer of `got` equals the local one: same top label, dog probability within ATOL."""
    worst = 0.0
    for key, answer in sorted(got.items()):
        want = expected[key]
        p_want, p_got = dog_probability(want), dog_probability(answer)
        diff = abs(p_want - p_got)
        worst = max(worst, diff)
        assert diff <= ATOL, "%s %s: local %s, %s %s (diff %.3g > %g)" % (key[0], key[1], want, where, answer,
                                                                         diff, ATOL)
        if abs(p_want - 0.5) > ATOL:
            assert set(want) == set(answer), (key, want, answer)
    say("%s: %d answers equal the local TorchServe's (largest difference %.3g, tolerance %g)"
        % (where, len(got), worst, ATOL))
    return worst


def container_logs(name):
    proc = subprocess.run(["docker", "logs", "--tail", "80", name], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    return proc.stdout


def remove_container(name):
    subprocess.run(["docker", "rm", "-f", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(name, timeout=START_TIMEOUT):
    """Until the image's HEALTHCHECK reports healthy."""
    deadline = time.monotonic() + timeout
    while True:
        state = json.loads(subprocess.run(["docker", "inspect", "-f", "{{json .State}}", name],
                                          stdout=subprocess.PIPE, universal_newlines=True).stdout or "{}")
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return
        if not state.get("Running") or health == "unhealthy" or time.monotonic() > deadline:
            raise AssertionError("%s is %s (health %s):\n%s" % (name, state.get("Status"), health,
                                                                 container_logs(name)))
        time.sleep(2)


def wait_serving(name, base_url, management_url, models, timeout=START_TIMEOUT):
    """Without a HEALTHCHECK (the stock image): until /ping is healthy and every model has a READY worker."""
    import requests
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(base_url + "/ping", timeout=5).status_code == 200 and all(
                    any(w.get("status") == "READY"
                        for w in requests.get("%s/models/%s" % (management_url, m), timeout=5).json()[0]["workers"])
                    for m in models):
                return
        except (requests.RequestException, ValueError, LookupError):
            pass
        running = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, universal_newlines=True).stdout.strip()
        if running != "true" or time.monotonic() > deadline:
            raise AssertionError("%s not serving (running: %s):\n%s" % (name, running or "gone", container_logs(name)))
        time.sleep(2)


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def report_timings():
    start = time.monotonic()
    yield
    say("timings: " + "; ".join("%s %.0fs" % t for t in TIMINGS) + "; all %.0fs" % (time.monotonic() - start))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A Docker engine: the running one, or one started here (and stopped at the end)."""
    if not shutil.which("docker"):
        pytest.fail("the docker client is not installed (Debian: apt-get install docker.io)")
    if docker_answers():
        say("using the running Docker engine")
        yield
        return
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        pytest.fail("no Docker engine answers and this user cannot start one (needs root and dockerd)")
    log_path = str(tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    args = shlex.split(os.environ.get("DOCKERD_ARGS", "--bridge=none"))
    say("starting dockerd %s (log: %s)" % (" ".join(args), log_path))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["dockerd"] + args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not docker_answers():
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log_path, errors="replace") as f:
                    pytest.fail("dockerd did not come up:\n" + f.read()[-3000:])
            time.sleep(1)
        yield
    finally:
        say("stopping the dockerd started here (pid %d)" % proc.pid)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def network(engine):
    """'publish': -p 127.0.0.1:P:8080 (an engine with a bridge); 'host': --network host (dockerd --bridge=none)."""
    mode = os.environ.get("DOCKER_TEST_NETWORK")
    if not mode:
        has_bridge = subprocess.run(["docker", "network", "inspect", "bridge"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL).returncode == 0
        mode = "publish" if has_bridge else "host"
    assert mode in ("publish", "host"), mode
    say("container networking: %s" % mode)
    return mode


@pytest.fixture(scope="module")
def model_store(tmp_path_factory):
    """(directory with the .mar files, model names, is it deployment/model-store)."""
    store, models, is_deployment_store, _ = archives_and_checkpoints(tmp_path_factory)
    return store, models, is_deployment_store


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{model: the checkpoint its archive was built from}, when known (for torch archives of the same weights)."""
    return archives_and_checkpoints(tmp_path_factory)[3]


_ARCHIVES = {}


def archives_and_checkpoints(tmp_path_factory):
    if not _ARCHIVES:
        _ARCHIVES["value"] = _make_archives(tmp_path_factory)
    return _ARCHIVES["value"]


def _make_archives(tmp_path_factory):
    store = os.environ.get("DOCKER_TEST_MODEL_STORE") or os.path.join(DEPLOYMENT, "model-store")
    models = sorted(n[:-4] for n in os.listdir(store) if n.endswith(".mar")) if os.path.isdir(store) else []
    if models:
        say("testing the archives of %s: %s" % (store, ", ".join(models)))
        is_deployment_store = os.path.abspath(store) == os.path.join(DEPLOYMENT, "model-store")
        shipped = {m: os.path.join(REPO_ROOT, "models", m, "model_%s.pth" % m) for m in models}
        return os.path.abspath(store), models, is_deployment_store, shipped if is_deployment_store else {}
    if os.environ.get("DOCKER_TEST_MODEL_STORE"):
        pytest.fail("no .mar file in DOCKER_TEST_MODEL_STORE=%s" % store)
    work = str(tmp_path_factory.mktemp("archives"))
    store = os.path.join(work, "model-store")
    os.makedirs(store)
    os.chmod(store, 0o755)  # bind-mounted into the stock-image container, whose user is not root
    models = ["base_cnn", "efficientnet_lite0"]
    say("no .mar file in deployment/model-store: archiving randomly initialised %s with deployment/archive.sh"
        % " and ".join(models))
    made = {}
    with timed("archive.sh (random weights)"):
        for conv_net, img_size in (("base_cnn", 64), ("efficientnet_lite0", 224)):
            made[conv_net] = make_checkpoint(work, conv_net, img_size)
            result = run_archive("--export-path", store, "%s=%s" % (conv_net, made[conv_net]),
                                 timeout=1800)  # minutes when the CPU is shared with a training run
            assert result.returncode == 0, result.stdout
    return store, models, False, made


@pytest.fixture(scope="module")
def torch_model_store(model_store, checkpoints, tmp_path_factory):
    """The same weights as torch archives (deployment/archive.sh --backend torch): what the stock image,
    which has no ONNX Runtime, can serve."""
    _, models, _ = model_store
    if set(checkpoints) != set(models):
        pytest.skip("the checkpoints of DOCKER_TEST_MODEL_STORE's archives are unknown")
    store = str(tmp_path_factory.mktemp("torch-archives"))
    os.chmod(store, 0o755)  # bind-mounted into the stock-image container, whose user is not root
    with timed("archive.sh --backend torch"):
        for conv_net in models:
            result = run_archive("--backend", "torch", "--export-path", store,
                                 "%s=%s" % (conv_net, checkpoints[conv_net]), timeout=1800)
            assert result.returncode == 0, result.stdout
    return store


@pytest.fixture(scope="module")
def ort_wheels(base_image, tmp_path_factory):
    """deployment/Dockerfile's PIP_ARGS: ONNX Runtime's wheels for the base image's Python, served on
    127.0.0.1 (the build runs with --network host). Empty where the build can reach PyPI itself
    (DOCKER_TEST_PIP_ARGS= set to '' or other arguments)."""
    if "DOCKER_TEST_PIP_ARGS" in os.environ:
        yield os.environ["DOCKER_TEST_PIP_ARGS"]
        return
    version = docker("run", "--rm", "--entrypoint", "python", base_image, "-c",
                     "import sys; print('%d%d' % sys.version_info[:2])", quiet=True).stdout.strip().splitlines()[-1]
    with open(os.path.join(DEPLOYMENT, "Dockerfile")) as f:
        pin = re.search(r"onnxruntime==[0-9.]+", f.read()).group(0)
    wheels = str(tmp_path_factory.mktemp("ort-wheels"))
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", wheels,
         "--python-version", version, "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64", pin], quiet=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", wheels,
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield "--no-index --find-links http://127.0.0.1:%d/" % port
    finally:
        server.terminate()
        server.wait()


@pytest.fixture(scope="module")
def base_image(engine):
    """The stock image named by DOCKER_TEST_BASE_IMAGE, or the local stand-in (built once, then reused)."""
    given = os.environ.get("DOCKER_TEST_BASE_IMAGE")
    if given:
        if not image_exists(given):
            docker("pull", given)
        yield given
        return
    built_here = not image_exists(STANDIN_IMAGE)
    with timed("stand-in image (deployment/standin/build.sh)"):
        run(["bash", STANDIN_BUILD], quiet=True, timeout=3600,
            env=dict(os.environ, STANDIN_IMAGE=STANDIN_IMAGE, STANDIN_ROOTFS_IMAGE=STANDIN_ROOTFS_IMAGE,
                     PYTHON=sys.executable))
    yield STANDIN_IMAGE
    if RMI == "all":
        say("removing %s and %s%s" % (STANDIN_IMAGE, STANDIN_ROOTFS_IMAGE, "" if built_here else " (built before)"))
        subprocess.run(["docker", "rmi", STANDIN_IMAGE, STANDIN_ROOTFS_IMAGE], stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def build_context(model_store, tmp_path_factory):
    """deployment/ itself when the archives are deployment/model-store's; else a copy of its Dockerfile,
    docker-compose.yml and every file the Dockerfile copies, next to a model-store/ of the test archives."""
    store, models, is_deployment_store = model_store
    if is_deployment_store:
        return DEPLOYMENT
    ctx = str(tmp_path_factory.mktemp("context"))
    for name in ["Dockerfile", "docker-compose.yml"] + dockerfile_copies():
        shutil.copy(os.path.join(DEPLOYMENT, name), ctx)
    os.makedirs(os.path.join(ctx, "model-store"))
    for model in models:
        shutil.copy(os.path.join(store, model + ".mar"), os.path.join(ctx, "model-store"))
    return ctx


@pytest.fixture(scope="module")
def project_image(base_image, build_context, ort_wheels):
    previous = image_id(TEST_IMAGE)
    with timed("docker build deployment/Dockerfile"):
        docker("build", "--network", "host", "-t", TEST_IMAGE, "--build-arg", "BASE_IMAGE=" + base_image,
               "--build-arg", "PIP_ARGS=" + ort_wheels, build_context, quiet=True)
    drop_replaced(TEST_IMAGE, previous)
    yield TEST_IMAGE
    if RMI:
        say("removing %s" % TEST_IMAGE)
        subprocess.run(["docker", "rmi", TEST_IMAGE], stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def local_answers(model_store, tmp_path_factory):
    """The same images through a local TorchServe (this virtualenv) serving the same archives."""
    store, models, _ = model_store
    workdir = str(tmp_path_factory.mktemp("local-torchserve"))
    with timed("local TorchServe: start, classify, stop"):
        with TorchServe(workdir, store, {m: m + ".mar" for m in models}) as server:
            answers = classify_all("http://127.0.0.1:%d" % server.inference_port, models)
    for (model, image), answer in sorted(answers.items()):
        say("local  %-20s %-12s %s" % (model, image, json.dumps(answer)))
    return answers


class Ports(object):
    def __init__(self):
        self.inference, self.management, self.metrics = free_port(), free_port(), free_port()
        self.grpc_inference, self.grpc_management = free_port(), free_port()

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.inference

    @property
    def management_url(self):
        return "http://127.0.0.1:%d" % self.management

    def publish_args(self):
        return ["-p", "127.0.0.1:%d:8080" % self.inference, "-p", "127.0.0.1:%d:8081" % self.management,
                "-p", "127.0.0.1:%d:8082" % self.metrics]

    def env(self):
        """TorchServe settings for --network host: everything on 127.0.0.1, on free ports. The project
        image's management API is a Unix socket inside the container, so it needs no port."""
        return {"TS_INFERENCE_ADDRESS": self.base_url,
                "TS_METRICS_ADDRESS": "http://127.0.0.1:%d" % self.metrics,
                "TS_GRPC_INFERENCE_PORT": str(self.grpc_inference),
                "TS_GRPC_MANAGEMENT_PORT": str(self.grpc_management)}


# ---- tests -------------------------------------------------------------------------------------

def test_image_is_non_root_with_healthcheck_and_models(project_image, model_store):
    _, models, _ = model_store
    config = json.loads(docker("inspect", "-f", "{{json .Config}}", project_image, quiet=True).stdout)
    assert config["User"] == "model-server"
    assert config["Healthcheck"] and config["Healthcheck"]["Test"], config.get("Healthcheck")
    assert config["Entrypoint"] == ["/usr/local/bin/dockerd-entrypoint.sh"] and config["Cmd"] == ["serve"]
    assert {"8080/tcp", "8082/tcp"} <= set(config["ExposedPorts"])  # (a base image's EXPOSE adds its own)
    listing = docker("run", "--rm", "--entrypoint", "bash", project_image, "-c",
                     "id -un; ls /home/model-server/model-store; cat /home/model-server/config.properties",
                     quiet=True).stdout.split("\n")
    assert listing[0] == "model-server"
    for model in models:
        assert model + ".mar" in listing
    settings = dict(line.split("=", 1) for line in listing if re.match(r"^[a-z_]+=", line))  # last one wins
    assert settings["load_models"] == "all"
    assert settings["model_store"] == "/home/model-server/model-store"
    assert settings["inference_address"] == "http://0.0.0.0:8080"


def test_project_image_answers_like_local_torchserve(project_image, network, model_store, local_answers):
    _, models, _ = model_store
    ports, name = Ports(), PREFIX + "-serve"
    if network == "publish":
        net_args = ports.publish_args()
    else:
        net_args = ["--network", "host"] + [a for k, v in sorted(ports.env().items()) for a in ("-e", "%s=%s" % (k, v))]
    try:
        with timed("project image: start until healthy"):
            docker("run", "-d", "--init", "--name", name, *net_args, project_image, quiet=True)
            wait_healthy(name)
        # nothing in the container runs as root: not the frontend (java), not the workers
        processes = [line.split(None, 2) for line in
                     docker("top", name, "-eo", "pid,uid,args", quiet=True).stdout.splitlines()[1:] if line.strip()]
        assert any(args.startswith("java") for _, _, args in processes), processes
        assert all(uid not in ("0", "root") for _, uid, _ in processes), processes
        with timed("project image: classify"):
            answers = classify_all(ports.base_url, models)
        for (model, image), answer in sorted(answers.items()):
            say("docker %-20s %-12s %s" % (model, image, json.dumps(answer)))
        compare(local_answers, answers, "project image (%s)" % network)
        # ... and through ONNX Runtime where the archives hold an ONNX model (deployment/archive.sh's default)
        store = model_store[0]
        onnx_models = [m for m in models if serialized_file(os.path.join(store, m + ".mar")).endswith(".onnx")]
        logs = "".join(subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      universal_newlines=True).stdout
                       for cmd in (["docker", "logs", name],
                                   ["docker", "exec", name, "sh", "-c", "cat /home/model-server/logs/model_log.log"]))
        for model in onnx_models:
            assert re.search(r"%s ready: onnx engine" % model, logs), "no ONNX Runtime worker for %s" % model
        say("served through ONNX Runtime: %s" % (", ".join(onnx_models) or "none (torch archives)"))
    finally:
        remove_container(name)


def serialized_file(archive_path):
    import zipfile
    with zipfile.ZipFile(archive_path) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"].get("serializedFile") or ""


def test_kubernetes_probes_answer_in_the_container(project_image, network, model_store):
    """deployment/kubernetes/deployment.yaml's probes, exactly as written, against the image run with the
    Deployment's environment and user: the readiness command inside the container (where the kubelet
    runs exec probes), GET /ping on the inference port, Prometheus text on the annotated metrics port."""
    with open(os.path.join(DEPLOYMENT, "kubernetes", "deployment.yaml")) as f:
        pod = yaml.safe_load(f)["spec"]["template"]
    (spec,) = pod["spec"]["containers"]
    user = pod["spec"]["securityContext"]["runAsUser"]
    image_uid = docker("run", "--rm", "--entrypoint", "id", project_image, "-u", quiet=True).stdout.strip()
    assert image_uid == str(user), "the image's user is uid %s, the Deployment runs uid %s" % (image_uid, user)
    env = {var["name"]: var["value"] for var in spec.get("env", [])}
    ports, name = Ports(), PREFIX + "-k8s"
    if network == "publish":
        net_args = ports.publish_args()
    else:  # the host's network: free loopback ports, the management API on loopback as in the pod
        env.update(ports.env())
        net_args = ["--network", "host"]
    env_args = [a for k, v in sorted(env.items()) for a in ("-e", "%s=%s" % (k, v))]
    _, models, _ = model_store
    readiness = spec["readinessProbe"]["exec"]["command"]
    assert sorted(readiness[3:]) == sorted(models)
    try:
        with timed("kubernetes probes: start until healthy"):
            docker("run", "-d", "--init", "--name", name, "--user", str(user), *net_args, *env_args, project_image,
                   quiet=True)
            wait_healthy(name)
        result = docker("exec", name, *readiness, check=False, quiet=True)
        assert result.returncode == 0, result.stdout
        for probe in ("startupProbe", "livenessProbe"):
            get = spec[probe]["httpGet"]
            assert get["port"] == "inference"
            assert requests.get(ports.base_url + get["path"], timeout=10).status_code == 200
        classify_all(ports.base_url, models, images=IMAGES[:1])  # so that there are inference metrics too
        annotations = pod["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == 8082
        metrics = requests.get("http://127.0.0.1:%d%s" % (ports.metrics, annotations["prometheus.io/path"]),
                               timeout=10)
        assert metrics.status_code == 200 and re.search(r"(?m)^# TYPE \w+ (counter|gauge|histogram)$", metrics.text)
        # No TCP port takes a management call (the API is on a Unix socket inside the container),
        # and what is served is unchanged after trying.
        with pytest.raises(requests.ConnectionError):
            requests.get(ports.management_url + "/models", timeout=10)
        for url in (ports.base_url, "http://127.0.0.1:%d" % ports.metrics):
            answer = requests.put(url + "/models/base_cnn?min_worker=0", timeout=10)
            assert not 200 <= answer.status_code < 300, (url, answer.status_code, answer.text)
        result = docker("exec", name, *readiness, check=False, quiet=True)
        assert result.returncode == 0, result.stdout
    finally:
        remove_container(name)


def test_readme_command_on_stock_image_answers_like_local_torchserve(base_image, network, model_store,
                                                                     torch_model_store, local_answers, tmp_path):
    """The original README command, on the stock image (or its stand-in), with torch archives of the same weights
    (the stock image has no ONNX Runtime): they answer as the ONNX archives do locally."""
    _, models, _ = model_store
    store = torch_model_store
    ports, name = Ports(), PREFIX + "-readme"
    if network == "publish":
        net_args = ports.publish_args()
    else:
        # The stock config binds 0.0.0.0:8080-8082; on the host's network use 127.0.0.1
        # and free ports instead: the image's own config with only the addresses changed.
        stock = docker("run", "--rm", "--entrypoint", "cat", base_image, "/home/model-server/config.properties",
                       quiet=True).stdout
        config = re.sub(r"(?m)^(inference|management|metrics)_address=.*$", "", stock).strip() + "\n" + "".join(
            "%s_address=http://127.0.0.1:%d\n" % (k, p)
            for k, p in (("inference", ports.inference), ("management", ports.management), ("metrics", ports.metrics)))
        config += "grpc_inference_port=%d\ngrpc_management_port=%d\n" % (ports.grpc_inference, ports.grpc_management)
        path = tmp_path / "config.properties"
        path.write_text(config)
        path.chmod(0o644)
        net_args = ["--network", "host", "-v", "%s:/home/model-server/config.properties:ro" % path]
    try:
        with timed("stock-image README command: start until serving"):
            docker("run", "--rm", "-d", *net_args, "--name", name,
                   "-v", "%s:/home/model-server/model-store" % store, base_image,
                   "torchserve", "--model-store", "/home/model-server/model-store/",
                   "--models", *[m + ".mar" for m in models], "--disable-token-auth", quiet=True)
            wait_serving(name, ports.base_url, ports.management_url, models)
        answers = classify_all(ports.base_url, models)
        compare(local_answers, answers, "stock-image README command (%s)" % network)
    finally:
        remove_container(name)


def compose_command():
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run(cmd + ["version"], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL).returncode == 0:
            return cmd
    return None


def test_compose_file_binds_loopback_and_serves(project_image, base_image, build_context, network, model_store,
                                                local_answers, tmp_path):
    _, models, _ = model_store
    compose_file = os.path.join(build_context, "docker-compose.yml")
    with open(compose_file) as f:
        spec = yaml.safe_load(f)
    service = spec["services"]["torchserve"]
    assert service["build"]["context"] == "." and service["build"]["dockerfile"] == "Dockerfile"
    for mapping in service["ports"]:
        assert mapping.startswith("127.0.0.1:"), mapping
    assert service.get("healthcheck") is None  # the image's HEALTHCHECK applies
    cmd = compose_command()
    if cmd is None:
        say("neither `docker compose` nor `docker-compose` is installed: compose file checked as YAML only")
        return
    ports = Ports()
    env = dict(os.environ, TORCHSERVE_BASE_IMAGE=base_image, DOGSCATS_IMAGE=project_image,
               INFERENCE_PORT=str(ports.inference), MANAGEMENT_PORT=str(ports.management),
               METRICS_PORT=str(ports.metrics))
    rendered = yaml.safe_load(run(cmd + ["-f", compose_file, "config"], env=env, quiet=True).stdout)
    rendered_ports = [str(p.get("host_ip", "")) + ":" + str(p.get("published")) if isinstance(p, dict) else p
                      for p in rendered["services"]["torchserve"]["ports"]]
    for mapping in rendered_ports:
        assert mapping.startswith("127.0.0.1:"), rendered_ports
    if network == "host":
        # Compose refuses published ports with network_mode: host: run a copy without them
        # (and with the build context spelled out, since the copy lives elsewhere).
        service = dict(service, network_mode="host", environment=ports.env(),
                       build=dict(service["build"], context=build_context))
        del service["ports"]
        compose_file = str(tmp_path / "docker-compose.host.yml")
        with open(compose_file, "w") as f:
            yaml.safe_dump({"services": {"torchserve": service}}, f)
    base = cmd + ["-p", PREFIX, "-f", compose_file]
    previous = image_id(project_image)
    try:
        with timed("docker compose up --build until healthy"):
            run(base + ["up", "-d", "--build"], env=env, quiet=True)
            drop_replaced(project_image, previous)
            container = run(base + ["ps", "-q", "torchserve"], env=env, quiet=True).stdout.strip()
            assert container, "compose started no container"
            wait_healthy(container)
        answers = classify_all(ports.base_url, models, images=IMAGES[:2])
        compare(local_answers, answers, "docker compose (%s)" % network)
    finally:
        run(base + ["down", "--timeout", "5"], env=env, check=False, quiet=True)


# ---- the KServe image (deployment/kserve/) ------------------------------------------------------
#
# deployment/kserve/build.sh builds it (the Debian 12 rootfs of the stand-in, or $KSERVE_BASE_IMAGE such as
# python:3.11-slim; wheels pip-downloaded here and served on loopback), tagged $DOCKER_TEST_KSERVE_IMAGE. The same
# images are classified by a local `python -m serving.kserve_server` (this virtualenv) and by the container over
# REST v2 (tritonclient, binary data), and must agree within DOCKER_TEST_ATOL. Then the container runs as
# deployment/kubernetes/kserve/deployment.yaml's pod does (its command line, user, read-only root with /tmp
# writable, no capabilities) and that pod's probes, gRPC and REST answer.

KSERVE_DIR = os.path.join(DEPLOYMENT, "kserve")
KSERVE_TEST_IMAGE = os.environ.get("DOCKER_TEST_KSERVE_IMAGE", "dogscats-kserve:docker-test")
KSERVE_HEALTHCHECK = "/opt/dogscats/deployment/kserve/healthcheck.py"


def kserve_models():
    from models import shipped_models
    return shipped_models()


def kserve_cmd():
    """deployment/kserve/Dockerfile's CMD (exec form)."""
    with open(os.path.join(KSERVE_DIR, "Dockerfile")) as f:
        return json.loads(re.search(r"(?m)^CMD (\[.*\])$", f.read()).group(1))


def with_address(argv, host, http_port, grpc_port):
    """A server command line with --host, --http-port and --grpc-port set to these (for --network host)."""
    values = {"--host": host, "--http-port": str(http_port), "--grpc-port": str(grpc_port)}
    out = list(argv)
    for flag, value in values.items():
        out[out.index(flag) + 1] = value
    return out


def kserve_classify(http_address, model, image):
    """One image through the Open Inference Protocol v2 over REST (binary data): (probabilities, label)."""
    import numpy as np
    import tritonclient.http as httpclient
    with open(image, "rb") as f:
        data = f.read()
    client = httpclient.InferenceServerClient(http_address, network_timeout=120.0)
    try:
        tensor = httpclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=np.object_), binary_data=True)
        result = client.infer(model, [tensor])
        return result.as_numpy("probabilities")[0].tolist(), result.as_numpy("label")[0].decode()
    finally:
        client.close()


def kserve_classify_all(http_address, models, images=IMAGES):
    return {(model, os.path.basename(image)): kserve_classify(http_address, model, image)
            for model in models for image in images}


def kserve_compare(expected, got, where):
    worst = 0.0
    for key, (probabilities, label) in sorted(got.items()):
        want_probabilities, want_label = expected[key]
        assert len(probabilities) == len(want_probabilities), (key, want_probabilities, probabilities)
        diff = max(abs(a - b) for a, b in zip(probabilities, want_probabilities))
        worst = max(worst, diff)
        assert diff <= ATOL, "%s %s: local %s, %s %s (diff %.3g > %g)" % (key[0], key[1], want_probabilities, where,
                                                                         probabilities, diff, ATOL)
        if abs(max(want_probabilities) - min(want_probabilities)) > ATOL:
            assert label == want_label, (key, want_label, label)
    say("%s: %d answers equal the local KServe server's (largest difference %.3g, tolerance %g)"
        % (where, len(got), worst, ATOL))


def wait_kserve_ready(base_url, proc, log_path, timeout=START_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(base_url + "/v2/health/ready", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            with open(log_path, errors="replace") as f:
                raise AssertionError("the local KServe server did not get ready (exit %s):\n%s"
                                     % (proc.poll(), f.read()[-3000:]))
        time.sleep(1)


@pytest.fixture(scope="module")
def kserve_image(engine):
    """deployment/kserve/build.sh (reuses an image built from the same inputs); removed again with --rmi."""
    previous = image_id(KSERVE_TEST_IMAGE)
    with timed("deployment/kserve/build.sh"):
        run(["bash", os.path.join(KSERVE_DIR, "build.sh")], quiet=True, timeout=3600,
            env=dict(os.environ, KSERVE_IMAGE=KSERVE_TEST_IMAGE, STANDIN_ROOTFS_IMAGE=STANDIN_ROOTFS_IMAGE,
                     PYTHON=sys.executable))
    drop_replaced(KSERVE_TEST_IMAGE, previous)
    yield KSERVE_TEST_IMAGE
    if RMI:
        say("removing %s" % KSERVE_TEST_IMAGE)
        subprocess.run(["docker", "rmi", KSERVE_TEST_IMAGE], stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def kserve_local_answers(tmp_path_factory):
    """The images through a local `python -m serving.kserve_server` (this virtualenv, the repository's models)."""
    http_port, grpc_port = free_port(), free_port()
    log_path = str(tmp_path_factory.mktemp("local-kserve") / "server.log")
    with timed("local KServe server: start, classify, stop"):
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "serving.kserve_server", "--http-port", str(http_port),
                                     "--grpc-port", str(grpc_port)], cwd=REPO_ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_kserve_ready("http://127.0.0.1:%d" % http_port, proc, log_path)
            answers = kserve_classify_all("127.0.0.1:%d" % http_port, kserve_models())
        finally:
            stop_process(proc)
    for (model, image), answer in sorted(answers.items()):
        say("local kserve  %-20s %-12s %s" % (model, image, json.dumps(answer)))
    return answers


def test_kserve_image_is_non_root_with_healthcheck_and_the_servers_command(kserve_image):
    config = json.loads(docker("inspect", "-f", "{{json .Config}}", kserve_image, quiet=True).stdout)
    assert config["User"] == "1000:1000"
    assert config["Cmd"] == kserve_cmd() and not config.get("Entrypoint")
    assert {"8080/tcp", "8081/tcp"} <= set(config["ExposedPorts"])
    assert config["Healthcheck"]["Test"] == ["CMD", "python", KSERVE_HEALTHCHECK]
    listing = docker("run", "--rm", kserve_image, "sh", "-c",
                     "id -u; id -g; ls /opt/dogscats/models/*/*.onnx; touch /opt/dogscats/x 2>&1 || echo read-only",
                     quiet=True).stdout.split("\n")
    assert listing[:2] == ["1000", "1000"]
    for model in kserve_models():
        assert "/opt/dogscats/models/%s/model_%s.onnx" % (model, model) in listing
    assert "read-only" in listing  # the code and models are root's: the server cannot change them


def test_kserve_image_answers_like_the_local_kserve_server(kserve_image, network, kserve_local_answers):
    http_port, grpc_port, name = free_port(), free_port(), PREFIX + "-kserve"
    if network == "publish":  # the image's own command, as docs/kserve.md runs it
        args = ["-p", "127.0.0.1:%d:8080" % http_port, "-p", "127.0.0.1:%d:8081" % grpc_port, kserve_image]
    else:  # the host's network: the same command on free loopback ports, and the health check on that port
        args = ["--network", "host", "--health-cmd", "python %s %d" % (KSERVE_HEALTHCHECK, http_port), kserve_image,
                *with_address(kserve_cmd(), "127.0.0.1", http_port, grpc_port)]
    try:
        with timed("KServe image: start until healthy"):
            docker("run", "-d", "--init", "--name", name, *args, quiet=True)
            wait_healthy(name)
        processes = [line.split(None, 2) for line in
                     docker("top", name, "-eo", "pid,uid,args", quiet=True).stdout.splitlines()[1:] if line.strip()]
        assert any("serving.kserve_server" in args for _, _, args in processes), processes
        assert all(uid not in ("0", "root") for _, uid, _ in processes), processes
        with timed("KServe image: classify"):
            answers = kserve_classify_all("127.0.0.1:%d" % http_port, kserve_models())
        kserve_compare(kserve_local_answers, answers, "KServe image (%s)" % network)
    finally:
        remove_container(name)


def test_kserve_pod_settings_and_probes_in_the_container(kserve_image, network, kserve_local_answers):
    """deployment/kubernetes/kserve/deployment.yaml's container as its pod runs it: its command line, its user,
    a read-only root file system with /tmp writable, no capabilities; then its probes as written, gRPC
    (ServerReady, ModelReady, one inference) and REST."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    with open(os.path.join(DEPLOYMENT, "kubernetes", "kserve", "deployment.yaml")) as f:
        (deployment,) = [doc for doc in yaml.safe_load_all(f) if doc and doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (spec,) = pod["containers"]
    assert spec["securityContext"]["readOnlyRootFilesystem"] is True
    assert [m["mountPath"] for m in spec["volumeMounts"]] == ["/tmp"]
    user = "%d:%d" % (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"])
    argv = spec["command"] + spec["args"]
    container_ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    http_port, grpc_port, name = free_port(), free_port(), PREFIX + "-kserve-pod"
    if network == "publish":
        net_args = ["-p", "127.0.0.1:%d:%d" % (http_port, container_ports["http"]),
                    "-p", "127.0.0.1:%d:%d" % (grpc_port, container_ports["h2c"])]
    else:
        net_args = ["--network", "host", "--health-cmd", "python %s %d" % (KSERVE_HEALTHCHECK, http_port)]
        argv = with_address(argv, "127.0.0.1", http_port, grpc_port)
    pod_args = ["--user", user, "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges"]
    models = kserve_models()
    try:
        with timed("KServe pod settings: start until healthy"):
            docker("run", "-d", "--init", "--name", name, *pod_args, *net_args, kserve_image, *argv, quiet=True)
            wait_healthy(name)
        base = "http://127.0.0.1:%d" % http_port
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            get = spec[probe]["httpGet"]
            port = container_ports[get["port"]] if isinstance(get["port"], str) else get["port"]
            assert port == container_ports["http"], (probe, get)
            answer = requests.get(base + get["path"], timeout=10)
            assert answer.status_code == 200, (probe, answer.status_code, answer.text)
        assert requests.get(base + "/v2/health/ready", timeout=10).json() == {"ready": True}
        client = grpcclient.InferenceServerClient("127.0.0.1:%d" % grpc_port)
        try:
            assert client.is_server_ready()
            assert all(client.is_model_ready(model) for model in models)
            with open(IMAGES[0], "rb") as f:
                tensor = grpcclient.InferInput("image", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([f.read()], dtype=np.object_))
            result = client.infer(models[0], [tensor])
            grpc_answer = {(models[0], os.path.basename(IMAGES[0])): (result.as_numpy("probabilities")[0].tolist(),
                                                                     result.as_numpy("label")[0].decode())}
        finally:
            client.close()
        kserve_compare(kserve_local_answers, grpc_answer, "KServe pod settings, gRPC (%s)" % network)
        answers = kserve_classify_all("127.0.0.1:%d" % http_port, models, images=IMAGES[:2])
        kserve_compare(kserve_local_answers, answers, "KServe pod settings, REST (%s)" % network)
    finally:
        remove_container(name)

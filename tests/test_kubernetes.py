"""deployment/kubernetes/: the manifests validate offline against Kubernetes' own schemas, and what
they say about the image (its name, user, ports, probes, models, the CPUs its workers use) is what
deployment/Dockerfile, deployment/config.properties and the model store say. No cluster needed.

The probes' exact commands run here against a stub management API and against a real local
TorchServe serving the shipped archives; tests/test_docker.py runs them in the real container
(RUN_DOCKER_TESTS=1).
"""
import http.server
import json
import os
import re
import subprocess
import sys
import threading

import pytest
import requests
import yaml
from kubernetes_validate.utils import all_versions

from tests.support import REPO_ROOT as ROOT, TEST1_DIR, dockerfile_copies

K8S = os.path.join(ROOT, "deployment", "kubernetes")
DEPLOYMENT_DIR = os.path.join(ROOT, "deployment")
STORE = os.path.join(DEPLOYMENT_DIR, "model-store")
IMAGE = "dogscats-torchserve"


def load(name):
    with open(os.path.join(K8S, name)) as f:
        return yaml.safe_load(f)


def kustomization():
    return load("kustomization.yaml")


def manifests():
    """{kind: manifest} of every resource kustomization.yaml lists."""
    return {doc["kind"]: doc for doc in map(load, kustomization()["resources"])}


def container():
    (only,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def dockerfile():
    with open(os.path.join(DEPLOYMENT_DIR, "Dockerfile")) as f:
        return f.read()


def properties(text):
    """key=value lines, later ones winning, as TorchServe reads config.properties."""
    return dict(re.findall(r"(?m)^\s*([a-z_]+)=(.*?)\s*$", text))


def container_settings():
    """The TorchServe settings a pod runs with: config.properties, then what the Dockerfile appends to it
    (its printf lines), then the Deployment's TS_* variables (the image sets enable_envvars_config)."""
    with open(os.path.join(DEPLOYMENT_DIR, "config.properties")) as f:
        settings = properties(f.read())
    appended = re.search(r"RUN printf '%s\\n' \\\n(.*?)>> /home/model-server/config.properties", dockerfile(), re.S)
    settings.update(properties("\n".join(re.findall(r"[\"']([a-z_]+=[^\"']*)[\"']", appended.group(1)))))
    assert settings["enable_envvars_config"] == "true"
    for var in container().get("env", []):
        if var["name"].startswith("TS_"):
            settings[var["name"][3:].lower()] = var["value"]
    return settings


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def readiness_command():
    return container()["readinessProbe"]["exec"]["command"]


def shipped_models():
    from models import shipped_models
    return shipped_models()


# ---- schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [all_versions()[0], all_versions()[-1]])  # the oldest and newest it ships
def test_manifests_validate_strictly_against_the_kubernetes_schemas_offline(version):
    files = [os.path.join(K8S, name) for name in kustomization()["resources"]]
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed ") == len(files) == 4, result.stdout


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    bad = tmp_path / "deployment.yaml"
    with open(os.path.join(K8S, "deployment.yaml")) as f:
        bad.write_text(f.read().replace("maxUnavailable: 0", "maxUnavailable: 0\n      maxUnavaliable: 1"))
    result = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "maxUnavaliable" in result.stdout + result.stderr


def test_kustomization_lists_every_manifest_and_names_the_project_image():
    k = kustomization()
    assert sorted(k["resources"]) == sorted(n for n in os.listdir(K8S)
                                            if n.endswith(".yaml") and n != "kustomization.yaml")
    assert [image["name"] for image in k["images"]] == [IMAGE]
    assert container()["image"] == IMAGE
    # the name the Dockerfile, docs/docker.md, docker-compose.yml and tests/test_docker.py build and run
    assert "docker build -t %s deployment/" % IMAGE in dockerfile()
    with open(os.path.join(DEPLOYMENT_DIR, "docker-compose.yml")) as f:
        assert yaml.safe_load(f)["services"]["torchserve"]["image"] == "${DOGSCATS_IMAGE:-%s:latest}" % IMAGE
    with open(os.path.join(ROOT, "tests", "test_docker.py")) as f:
        assert '"DOCKER_TEST_IMAGE", "%s:' % IMAGE in f.read()


# ---- what the manifests say about the image --------------------------------------------------------

def test_every_file_the_dockerfile_copies_is_in_its_build_context():
    copies = dockerfile_copies()
    assert {"config.properties", "log4j2.xml", "readiness.py"} <= set(copies)
    assert [name for name in copies if not os.path.isfile(os.path.join(DEPLOYMENT_DIR, name))] == []


def test_ports_match_the_image_and_only_inference_and_metrics_leave_the_pod():
    settings = container_settings()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {name: port_of(settings["%s_address" % name]) for name in ("inference", "metrics")}
    exposed = {int(p) for p in re.findall(r"(?m)^EXPOSE (.*)$", dockerfile())[0].split()}
    assert set(ports.values()) == exposed  # and no management port: there is none
    # Reachable from other pods: what listens on 0.0.0.0. The management API is on a Unix socket
    # inside the container: no port at all.
    assert settings["inference_address"].startswith("http://0.0.0.0:")
    assert settings["metrics_address"].startswith("http://0.0.0.0:")
    assert settings["management_address"].startswith("unix:/")
    service = manifests()["Service"]["spec"]
    assert {p["targetPort"] for p in service["ports"]} == {"inference", "metrics"}
    assert {p["name"]: p["port"] for p in service["ports"]} == {"inference": ports["inference"],
                                                                 "metrics": ports["metrics"]}


def test_prometheus_annotations_point_at_a_metrics_api_in_prometheus_mode():
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    settings = container_settings()
    assert annotations["prometheus.io/scrape"] == "true"
    assert settings.get("metrics_mode") == "prometheus"  # the default, "log", serves nothing to scrape
    assert int(annotations["prometheus.io/port"]) == port_of(settings["metrics_address"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_probes_mean_alive_and_every_model_ready():
    c = container()
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/ping", "port": "inference"}
    command = readiness_command()
    # the project's one readiness check, copied into the image, run by the image's Python as its HEALTHCHECK is
    assert command[:2] == ["python", "/home/model-server/readiness.py"]
    assert "COPY --chown=model-server readiness.py /home/model-server/" in dockerfile()
    assert re.search(r"(?m)^    CMD python /home/model-server/readiness.py$", dockerfile())
    # the archives the image is built with (COPY model-store/*.mar, LOAD_MODELS=all)
    assert "ARG LOAD_MODELS=all" in dockerfile() and "COPY --chown=model-server model-store/*.mar" in dockerfile()
    if shipped_models():
        assert command[2:] == shipped_models()


def test_non_root_user_of_the_image_and_resources_for_its_workers():
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert "USER model-server" in dockerfile().splitlines()
    # model-server is uid 1000 in the stock image and the stand-in (its only user, made by useradd)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert container()["securityContext"]["capabilities"]["drop"] == ["ALL"]
    resources = container()["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    cpus = int(resources["requests"]["cpu"])
    for model in shipped_models() or ["base_cnn", "efficientnet_lite0"]:
        with open(os.path.join(DEPLOYMENT_DIR, "model-config", model + ".yaml")) as f:
            config = yaml.safe_load(f)
        assert config["maxWorkers"] * config["handler"]["threads"] <= cpus, model


def test_autoscaler_disruption_budget_and_service_select_the_deployment():
    m = manifests()
    deployment = m["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert m["Service"]["spec"]["selector"].items() <= labels.items()
    assert m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = m["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert m["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2  # several replicas, whatever the load
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert m["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# ---- the readiness probe's exact command ----------------------------------------------------------

class ManagementStub(http.server.BaseHTTPRequestHandler):
    """GET /models/<name> as TorchServe 0.12 answers it, from `statuses`: {model: [worker status, ...]}."""
    statuses = {}

    def do_GET(self):
        model = self.path.rsplit("/", 1)[-1]
        if self.path == "/models":  # the list of registered models
            body, code = {"models": [{"modelName": m, "modelUrl": m + ".mar"} for m in self.statuses]}, 200
        elif not self.path.startswith("/models/") or model not in self.statuses:
            body, code = {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: " + model}, 404
        else:
            body, code = [{"modelName": model, "workers": [{"id": str(9000 + i), "status": s}
                                                             for i, s in enumerate(self.statuses[model])]}], 200
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ManagementStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_readiness(address, models=None):
    """The probe's command, with deployment/readiness.py where the image has it."""
    command = readiness_command()
    models = command[2:] if models is None else models
    return subprocess.run([sys.executable, os.path.join(DEPLOYMENT_DIR, "readiness.py")] + models,
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, TS_MANAGEMENT_ADDRESS=address))


@pytest.mark.parametrize("statuses, ready", [
    ({"base_cnn": ["READY", "READY"], "efficientnet_lite0": ["READY"]}, True),
    ({"base_cnn": ["READY", "UNLOADING"], "efficientnet_lite0": ["READY"]}, True),  # one worker can answer
    ({"base_cnn": ["READY", "READY"], "efficientnet_lite0": ["LOADING"]}, False),
    ({"base_cnn": [], "efficientnet_lite0": ["READY"]}, False),
    ({"base_cnn": ["READY", "READY"]}, False),  # efficientnet_lite0 not registered: 404
])
def test_readiness_command_against_a_management_api(stub, statuses, ready):
    ManagementStub.statuses = statuses
    result = run_readiness("http://127.0.0.1:%d" % stub.server_port, ["base_cnn", "efficientnet_lite0"])
    assert (result.returncode == 0) == ready, result.stderr


def test_readiness_command_checks_every_registered_model_and_fails_without_a_server(stub):
    """Named no model (the image's HEALTHCHECK), it checks every model the server has registered."""
    address = "http://127.0.0.1:%d" % stub.server_port
    ManagementStub.statuses = {"base_cnn": ["READY"], "efficientnet_lite0": ["READY"]}
    assert run_readiness(address, []).returncode == 0
    ManagementStub.statuses = {"base_cnn": ["READY"], "efficientnet_lite0": ["LOADING"]}
    result = run_readiness(address, [])
    assert result.returncode == 1 and result.stderr.strip() == "not ready: efficientnet_lite0: 0 of 1 workers READY"
    ManagementStub.statuses = {}
    assert run_readiness(address, []).stderr.strip() == "not ready: no model is registered"
    stub.shutdown()
    stub.server_close()
    assert run_readiness(address, ["base_cnn"]).returncode != 0


@pytest.mark.skipif(not shipped_models(), reason="needs the archives of deployment/model-store")
def test_probes_against_a_real_torchserve_serving_the_shipped_archives(shipped_server):
    """The readiness command (over the management socket, as in the pod), /ping and the Prometheus
    endpoint, on the session's server: the settings the pod gets (its metrics mode is the shipped one)."""
    from serving import torchserve
    assert container_settings()["metrics_mode"] == dict(torchserve.read_properties(torchserve.SHIPPED_CONFIG))["metrics_mode"]
    models = shipped_models()
    server = shipped_server
    assert server.management_address.startswith("unix:/")
    result = run_readiness(server.management_address)
    assert result.returncode == 0, result.stderr
    assert run_readiness(server.management_address, ["base_cnn", "nosuch"]).returncode != 0
    # as the image's HEALTHCHECK runs it: no model named (every registered one), the address from the config
    env = {k: v for k, v in os.environ.items() if k != "TS_MANAGEMENT_ADDRESS"}
    healthcheck = subprocess.run([sys.executable, os.path.join(DEPLOYMENT_DIR, "readiness.py")], capture_output=True,
                                 text=True, timeout=60, env=dict(env, TS_CONFIG_FILE=server.config_path))
    assert healthcheck.returncode == 0, healthcheck.stderr
    assert requests.get(server.url("/ping"), timeout=10).status_code == 200
    with open(os.path.join(TEST1_DIR, "1.jpg"), "rb") as f:
        image = f.read()
    for model in models:  # a request each, so that there are inference metrics
        assert requests.post(server.predict_url(model), data=image, timeout=60).status_code == 200
    metrics = requests.get("http://127.0.0.1:%d/metrics" % server.metrics_port, timeout=10)
    assert metrics.status_code == 200
    assert re.search(r"(?m)^# TYPE \w+ (counter|gauge|histogram)$", metrics.text), metrics.text[:500]

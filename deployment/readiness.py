"""Is TorchServe ready to answer? The one readiness check of this project.

    python readiness.py [MODEL ...]     exit 0: every MODEL (default: every registered model) has a
                                        worker in state READY; else exit 1 with one line saying which not

Ready means what a client needs: each model has a worker that can answer a prediction now, as the
management API's `GET /models/<name>` reports it. Not TorchServe's `/ping`, which tells only that
the frontend is up: docs/serving.md, "Health and readiness", says what it answers when.

Used by `make serve` (serving/torchserve.py waits, with workers(), until all of a model's minWorkers are
READY), by the image's HEALTHCHECK and by the Kubernetes readiness probe (deployment/Dockerfile copies this file
into the image). The management API is the address in config.properties (management_address: a
Unix socket, `unix:/path`, or `http://host:port`); TS_MANAGEMENT_ADDRESS overrides it, as it does
for TorchServe itself. Standard library only: it runs on the image's Python.
"""
import http.client
import json
import os
import re
import socket
import sys

CONFIG = os.environ.get("TS_CONFIG_FILE", "/home/model-server/config.properties")


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(address, method, path, body=None, timeout=10, headers=None):
    """(status, body text) of one request to a TorchServe API at `address` (http://host:port or unix:/path)."""
    if address.startswith("unix:"):
        connection = _UnixHTTPConnection(address[len("unix:"):], timeout)
    else:
        host, port = re.match(r"^https?://([^:/]+):(\d+)", address).groups()
        connection = http.client.HTTPConnection(host.replace("0.0.0.0", "127.0.0.1"), int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def management_address(config=CONFIG):
    """TS_MANAGEMENT_ADDRESS, else the last management_address of `config` (a later key wins)."""
    if os.environ.get("TS_MANAGEMENT_ADDRESS"):
        return os.environ["TS_MANAGEMENT_ADDRESS"]
    with open(config) as f:
        return re.findall(r"(?m)^management_address=(\S+)", f.read())[-1]


def workers(address, model, timeout=4):
    """(PIDs of the READY workers, minWorkers) of `model`; raises LookupError when it is not registered."""
    status, body = request(address, "GET", "/models/" + model, timeout=timeout)
    if status != 200:
        raise LookupError("%s: HTTP %d" % (model, status))
    described = json.loads(body)[0]
    return ([w.get("pid") for w in described.get("workers", []) if w.get("status") == "READY"],
            described.get("minWorkers", 1))


def registered(address, timeout=4):
    """The names of every model the server has registered."""
    status, body = request(address, "GET", "/models", timeout=timeout)
    if status != 200:
        raise LookupError("listing the models: HTTP %d" % status)
    return [m["modelName"] for m in json.loads(body).get("models", [])]


def not_ready(address, models=None, timeout=4):
    """None when every model in `models` (None: every registered one) has a READY worker; else one line saying
    which is not. Connection errors say so too."""
    try:
        models = list(models) if models else registered(address, timeout)
        if not models:
            return "no model is registered"
        for model in models:
            ready, minimum = workers(address, model, timeout)
            if not ready:
                return "%s: %d of %d workers READY" % (model, len(ready), minimum)
    except (OSError, ValueError, LookupError, IndexError, KeyError, http.client.HTTPException) as exc:
        return "%s: %s" % (address, exc)
    return None


def main(argv=None):
    why = not_ready(management_address(), (sys.argv[1:] if argv is None else argv))
    if why:
        sys.exit("not ready: " + why)


if __name__ == "__main__":
    main()

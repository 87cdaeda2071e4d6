"""The KServe image's HEALTHCHECK: exit status 0 when the server in this container is ready, 1 when not.

    python /opt/dogscats/deployment/kserve/healthcheck.py [HTTP_PORT]      (default 8080, the image's)

Ready is the Open Inference Protocol's server readiness, GET /v2/health/ready on the container's loopback:
HTTP 200, and where the answer is JSON, {"ready": true}. serving/kserve_server.py answers it only once every
model it serves is loaded; the Kubernetes readiness probes (deployment/kubernetes/kserve/) ask the same URL.
Standard library only, run by the image's Python: the image has no curl. Proxy variables are ignored (the
request never leaves the container). The reason for "not ready" goes to stderr, which `docker inspect`
shows under State.Health.
"""
import json
import sys
import urllib.error
import urllib.request

DEFAULT_PORT = 8080
TIMEOUT = 4  # seconds; the HEALTHCHECK's --timeout is 5


def check(port):
    """None when ready, else why not (one line)."""
    url = "http://127.0.0.1:%d/v2/health/ready" % port
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=TIMEOUT) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return "%s: HTTP %d" % (url, exc.code)
    except (OSError, ValueError) as exc:  # refused, timed out, reset
        return "%s: %s" % (url, getattr(exc, "reason", None) or exc)
    if status != 200:
        return "%s: HTTP %d" % (url, status)
    try:
        ready = json.loads(body).get("ready", True)
    except (ValueError, AttributeError):
        ready = True  # a 200 that is not a JSON object: the status says it
    return None if ready is True else "%s: %s" % (url, body[:200].decode("utf-8", "replace"))


def main(argv):
    port = int(argv[1]) if len(argv) > 1 else DEFAULT_PORT
    why = check(port)
    if why:
        print("not ready: " + why, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

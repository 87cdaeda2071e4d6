"""The command line of `make serve`, `make stop` and `make status`: python -m serving start|status|stop
(serving/torchserve.py's docstring says what each does)."""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys

from deployment import readiness
from serving import torchserve
from serving.torchserve import (ARCHIVE_SH, LOGS, MODEL_STORE, REPO_ROOT, SERVE_CHECK_IMAGES, SHIPPED_CONFIG, STATE_DIR,
                                TorchServe, TorchServeError, _stop_processes, _running)


# ---- the command line: make serve / make stop -------------------------------------------------------

def _fail(message):
    print("error: %s" % message, file=sys.stderr)
    return 2


def _state_file(args):
    return os.path.join(args.state_dir, "server.json")


def _load_state(args):
    """The running server `start` left, as {...}, or None (no file, or its processes are gone)."""
    import psutil
    try:
        with open(_state_file(args)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    procs = []
    for pid, created in state.get("processes", []):
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 1e-3 and _running(proc):  # the same process, not a reused pid
                procs.append(proc)
        except psutil.Error:
            pass
    if not procs:
        return None
    state["procs"] = procs
    return state


def _save_state(args, running, **fields):
    """What `stop` and `status` need of the server `start` left running: its processes (PID and start time,
    so that a reused PID is never taken for it) and `fields` (its models and addresses)."""
    import psutil
    procs = []
    for pid in sorted(running._process_tree()):
        try:
            procs.append([pid, psutil.Process(pid).create_time()])
        except psutil.Error:
            pass
    with open(_state_file(args), "w") as f:
        json.dump(dict(fields, processes=procs), f, indent=1)


def cmd_start(args):
    running = _load_state(args)
    if running:
        return _fail("%s is already running (pid %d, %s): `make stop` first"
                     % (_server_name(running), running["procs"][0].pid, running["inference_address"]))
    if args.server == "kserve":
        return start_kserve(args)
    if not args.models:  # the shipped models, asked of the registry (this imports torch: start only)
        from models import shipped_models
        args.models = shipped_models()
    missing = [m for m in args.models if not os.path.exists(os.path.join(args.model_store, m + ".mar"))]
    if missing:  # only an archive that is missing: the shipped ones are committed, and built from the same files
        print("building %s with deployment/archive.sh" % ", ".join(m + ".mar" for m in missing), flush=True)
        built = subprocess.run(["bash", ARCHIVE_SH, "--export-path", args.model_store] + missing,
                               env=dict(os.environ, PYTHON=sys.executable))
        if built.returncode != 0:
            return _fail("deployment/archive.sh could not build %s (its messages are above)" % ", ".join(missing))
    models = {m: m + ".mar" for m in args.models}
    server = TorchServe(args.state_dir, args.model_store, models, free_ports=False, logs=args.logs,
                        start_timeout=args.timeout, config=args.config)
    print("starting TorchServe: %s (logs in %s/)" % (", ".join(args.models), server._show(server.logs)),
          flush=True)
    try:
        server.start(detach=True)
    except TorchServeError as e:
        return _fail(str(e))
    _save_state(args, server, models=server.models, private=server._private,
                inference_address=server.inference_address, management_address=server.management_address,
                metrics_address=server.metrics_address, logs=server.logs)
    for model in args.models:
        for image in args.classify:
            with open(os.path.join(REPO_ROOT, image) if not os.path.isabs(image) else image, "rb") as f:
                status, body = readiness.request(server.inference_address, "POST", "/predictions/" + model,
                                            body=f.read(), timeout=120)
            print("%s %s -> %s" % (model, image, body.strip() if status == 200 else "HTTP %d %s" % (status, body.strip())))
    print("TorchServe is running: inference %s, management %s (stop it with: make stop)"
          % (server.inference_address, server.management_address))
    return 0


def _server_name(state):
    return "the KServe server" if state.get("server") == "kserve" else "TorchServe"


def start_kserve(args):
    """python -m serving start --server kserve: serving/kserve_server.py in the background on 127.0.0.1 (HTTP
    --http-port, gRPC --grpc-port), until /v2/health/ready; classify the sample images; leave it running."""
    from serving.kserve_runner import KServeServer
    # importing it imports neither kserve nor torch: only its constants are needed here
    from serving.kserve_server import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT
    os.makedirs(args.logs, exist_ok=True)
    server = KServeServer(os.path.join(args.logs, "kserve.log"), args.models,
                          http_port=args.http_port or DEFAULT_HTTP_PORT, grpc_port=args.grpc_port or DEFAULT_GRPC_PORT,
                          start_timeout=args.timeout)
    print("starting the KServe server: %s (log in %s)" % (", ".join(args.models or ["the shipped models"]),
                                                          TorchServe._show(server.log)), flush=True)
    os.makedirs(args.state_dir, exist_ok=True)
    try:
        server.start(detach=True)
    except TorchServeError as e:
        return _fail(str(e))
    try:
        models = json.loads(readiness.request(server.inference_address, "GET", "/v2/models")[1])["models"]
        _save_state(args, server, server="kserve", models=models, inference_address=server.inference_address,
                    grpc_address=server.grpc_address, management_address=None, logs=args.logs)
    except BaseException:  # a server nobody could stop must not be left behind
        server.stop()
        raise
    for model in models:
        for image in args.classify:
            with open(os.path.join(REPO_ROOT, image) if not os.path.isabs(image) else image, "rb") as f:
                status, answer = server.classify(model, f.read())
            print("%s %s -> %s" % (model, image,
                                   json.dumps(answer) if status == 200 else "HTTP %d %s" % (status, answer)))
    print("the KServe server is running: REST %s, gRPC %s (Open Inference Protocol v2; stop it with: make stop)"
          % (server.inference_address, server.grpc_address))
    return 0


def _running_state(args):
    """The state of the server `start` left running, or None after saying that none runs."""
    state = _load_state(args)
    if not state:
        print("no server is running (nothing started by `make serve` or `make serve-kserve`)")
    return state


def cmd_stop(args):
    state = _running_state(args)
    if not state:
        return 0
    import psutil
    procs = list(state["procs"])
    for proc in list(procs):  # the workers started since: children of the frontend
        try:
            procs += [c for c in proc.children(recursive=True) if c.pid not in {p.pid for p in procs}]
        except psutil.Error:
            pass
    _stop_processes(procs)
    if state.get("private"):
        shutil.rmtree(state["private"], ignore_errors=True)
    os.remove(_state_file(args))
    print("%s stopped (pid %d)" % (_server_name(state), state["procs"][0].pid))
    return 0


def cmd_status(args):
    state = _running_state(args)
    if not state:
        return 1
    if state.get("server") == "kserve":
        parts = ["%s %s" % (m, "ready" if readiness.request(state["inference_address"], "GET",
                                                             "/v2/models/%s/ready" % m)[0] == 200 else "NOT ready")
                 for m in state["models"]]
        print("the KServe server is running (pid %d): %s; REST %s, gRPC %s"
              % (state["procs"][0].pid, ", ".join(parts), state["inference_address"], state["grpc_address"]))
        return 0
    parts = []
    for model in state["models"]:
        try:
            ready, minimum = readiness.workers(state["management_address"], model)
            parts.append("%s %d/%d workers READY" % (model, len(ready), minimum))
        except (OSError, ValueError, LookupError, http.client.HTTPException) as e:
            parts.append("%s: %s" % (model, e))
    print("TorchServe is running (pid %d): %s; inference %s, management %s"
          % (state["procs"][0].pid, ", ".join(parts), state["inference_address"], state["management_address"]))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=torchserve.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=STATE_DIR,
                        help="where start keeps the generated config and the PIDs stop needs (.torchserve/)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start TorchServe on the shipped config (or the KServe server), wait for "
                                         "READY, classify")
    start.add_argument("--server", choices=["torchserve", "kserve"], default="torchserve",
                       help="torchserve (the specification's), or kserve: KServe's ModelServer on the ONNX exports, "
                            "Open Inference Protocol v2 over REST and gRPC (serving/kserve_server.py)")
    start.add_argument("--http-port", type=int, default=None, help="kserve: REST port (8090)")
    start.add_argument("--grpc-port", type=int, default=None, help="kserve: gRPC port (8091)")
    start.add_argument("--models", nargs="+", default=None,
                       help="the models to serve (default: the shipped ones, models.shipped_models())")
    start.add_argument("--model-store", default=MODEL_STORE)
    start.add_argument("--config", default=SHIPPED_CONFIG, help="the config.properties to serve with")
    start.add_argument("--logs", default=LOGS)
    start.add_argument("--classify", nargs="*", default=list(SERVE_CHECK_IMAGES), metavar="IMG",
                       help="images each model classifies once it is ready (none: --classify)")
    start.add_argument("--timeout", type=float, default=300, help="seconds to wait for every model (300)")
    sub.add_parser("stop", help="stop the server `start` started")
    sub.add_parser("status", help="is it running, and how many workers each model has READY (exit 1: not running)")
    args = parser.parse_args(argv)
    try:
        return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[args.command](args)
    except KeyboardInterrupt:
        return _fail("interrupted")


if __name__ == "__main__":
    sys.exit(main())

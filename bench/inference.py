"""In-process inference of the shipped models: single-image latency and batched throughput.

    .venv/bin/python bench/inference.py --images data/test1
    .venv/bin/python bench/inference.py --smoke                 # seconds, random weights, test fixtures

Everything starts from the JPEG bytes in memory (as a server receives them), so each
figure includes decode + preprocess + forward + softmax, with the project's own code
(models.transforms.open_rgb / eval_transform, models.load_trained, torch's default
thread count):

single   one image at a time: latency p50 / p99 / mean.
batched  N images decoded and preprocessed one by one, stacked, one forward pass:
         images/s for each --batch_sizes; also the forward pass alone at the largest.

Two memory layouts per model: channels_last, what predict_main.py, evaluate_main.py and
models/handler.py run (the project's path: the ceiling the server is measured against),
and NCHW (contiguous), PyTorch's default, for comparison.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (FIXTURE_TEST1, SHIPPED_MODELS, default_checkpoint, default_out,  # noqa: E402
                          describe_machine, fmt, latency_summary, load_payloads, machine_info, markdown_table,
                          random_checkpoint, write_json)

LAYOUTS = ("channels_last", "nchw")


def add_arguments(p):
    p.add_argument("--images", default="data/test1", help="unlabeled test images (Kaggle's test1/)")
    p.add_argument("--models", nargs="+", default=list(SHIPPED_MODELS), choices=list(SHIPPED_MODELS))
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                   help="weights to use instead of models/MODEL/model_MODEL.pth (repeatable)")
    p.add_argument("--random_weights", action="store_true",
                   help="untrained weights at each model's default size (a fresh clone has no trained ones)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.add_argument("--single", type=int, default=100, help="single-image calls timed per model and layout")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
    p.add_argument("--batched_images", type=int, default=256, help="images per batched measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--smoke", action="store_true",
                   help="a few calls on the test fixtures with random weights: checks the script, measures nothing")
    p.add_argument("--out", default=None, help="JSON output (default: bench/results/inference.json)")
    args = p.parse_args(argv)
    if args.smoke:
        apply_smoke(args)
        args.single, args.batched_images, args.warmup = min(args.single, 4), min(args.batched_images, 8), 1
        args.batch_sizes = [min(b, 4) for b in args.batch_sizes][:1]
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


class InProcess(object):
    """A trained model as the project runs it in-process, in one memory layout."""

    def __init__(self, conv_net, checkpoint, layout="channels_last"):
        import torch
        from models import load_trained
        from models.transforms import eval_transform
        model, self.img_size = load_trained(conv_net, checkpoint)
        self.memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.transform = eval_transform(self.img_size)

    def preprocess(self, data):
        from models.transforms import open_rgb
        return self.transform(open_rgb(data, self.img_size))

    def forward(self, batch):
        import torch
        with torch.inference_mode():
            x = batch.contiguous(memory_format=self.memory_format)
            return torch.softmax(self.model(x).float(), dim=1)

    def predict(self, payloads):
        import torch
        return self.forward(torch.stack([self.preprocess(p) for p in payloads]))


def measure(conv_net, checkpoint, payloads, layout, single=100, batch_sizes=(8, 32), batched_images=256,
            warmup=5):
    runner = InProcess(conv_net, checkpoint, layout)
    n = len(payloads)
    for i in range(warmup):
        runner.predict([payloads[i % n]])
    latencies = []
    for i in range(single):
        start = time.perf_counter()
        runner.predict([payloads[i % n]])
        latencies.append(time.perf_counter() - start)
    row = {"conv_net": conv_net, "layout": layout, "img_size": runner.img_size, "single_calls": single}
    row.update({"single_" + k: v for k, v in latency_summary(latencies).items()})
    row["batched_img_s"] = {}
    for batch_size in batch_sizes:
        batches = max(1, batched_images // batch_size)
        runner.predict([payloads[i % n] for i in range(batch_size)])  # warm-up at this shape
        start = time.perf_counter()
        for b in range(batches):
            runner.predict([payloads[(b * batch_size + i) % n] for i in range(batch_size)])
        row["batched_img_s"][str(batch_size)] = batches * batch_size / (time.perf_counter() - start)
    best = max(row["batched_img_s"], key=lambda b: row["batched_img_s"][b])
    row["best_batch_size"], row["best_batched_img_s"] = int(best), row["batched_img_s"][best]
    # the forward pass alone, at the largest batch size, on already-preprocessed images
    import torch
    batch_size = max(batch_sizes)
    batch = torch.stack([runner.preprocess(payloads[i % n]) for i in range(batch_size)])
    runner.forward(batch)
    batches = max(1, batched_images // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        runner.forward(batch)
    row["forward_only_img_s"] = batches * batch_size / (time.perf_counter() - start)
    return row


def run(args, payloads, checkpoints, layouts=LAYOUTS, log=sys.stderr):
    rows = []
    for conv_net in args.models:
        for layout in layouts:
            print("  in-process %s (%s) ..." % (conv_net, layout), file=log)
            rows.append(measure(conv_net, checkpoints[conv_net], payloads, layout, args.single, args.batch_sizes,
                                args.batched_images, args.warmup))
    return rows


def render(rows):
    batch_sizes = sorted({int(b) for r in rows for b in r["batched_img_s"]})
    headers = (["model", "layout", "px", "single p50 ms", "single p99 ms", "single mean ms"]
               + ["batch %d img/s" % b for b in batch_sizes] + ["forward only img/s (batch %d)" % batch_sizes[-1]])
    table = []
    for r in rows:
        table.append([r["conv_net"], r["layout"] + (" (project)" if r["layout"] == "channels_last" else " (default)"),
                      r["img_size"], fmt(r["single_p50_ms"], 2), fmt(r["single_p99_ms"], 2),
                      fmt(r["single_mean_ms"], 2)]
                     + [fmt(r["batched_img_s"].get(str(b))) for b in batch_sizes] + [fmt(r["forward_only_img_s"])])
    return markdown_table(headers, table)


def main(argv=None):
    args = parse_args(argv)
    _, payloads = load_payloads(args.images, 200)
    checkpoints = resolve_checkpoints(args)
    info = machine_info()
    print("machine: %s" % describe_machine(info), file=sys.stderr)
    rows = run(args, payloads, checkpoints)
    print()
    print("In-process inference from JPEG bytes (%d images of %s; decode + preprocess + forward + softmax)%s" % (
        len(payloads), args.images, "; SMOKE RUN, not a measurement" if args.smoke else ""))
    print()
    print(render(rows))
    write_json(args.out, {"benchmark": "inference", "smoke": args.smoke, "machine": info,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"},
                          "checkpoints": checkpoints, "results": rows})
    return rows


if __name__ == "__main__":
    main()

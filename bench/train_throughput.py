"""Training throughput (images/s): a naive PyTorch input pipeline against the project's default path.

    .venv/bin/python -m bench.train_throughput --data_dir data/train
    .venv/bin/python -m bench.train_throughput --smoke          # seconds, on the test fixtures

For each model, at its default image size and batch size, in the same process:

naive    torchvision-style: a Dataset over the JPEG files (PIL decode, Resize((S, S)),
         RandomHorizontalFlip, ToTensor, Normalize) in a standard DataLoader
         (num_workers=2, shuffle), fp32, NCHW model and inputs.
project  train_main.py's default path: every image decoded once, resized to S and
         cached as uint8 tensors (dataset.decode_images), then per epoch only the
         in-memory augmentation (models.transforms.train_augment) in the DataLoader
         workers, per-batch normalization, channels_last model and inputs, and the
         precision `--precision auto` picks (fp32 on a CPU without AMX).

Both run train.py's own train_step (Adam, cross-entropy) for --warmup steps, then
--steps timed steps over one DataLoader iterator; images/s = timed images / seconds.
The project path's one-time decode is timed separately on --decode_sample images and
projected to the whole data folder; "amortized" spreads it over the model's default
number of epochs: epochs x train images / (decode + epochs x epoch time).
"""
import argparse
import random
import sys
import time

if __name__ == "__main__" and not __package__:
    sys.exit("run it from the repository root as a module: python -m bench.train_throughput %s"
             % " ".join(sys.argv[1:]))

from bench.common import (FIXTURE_TRAIN, SHIPPED_MODELS, Stopwatch, default_out, describe_machine, fmt,
                          machine_info, markdown_table, write_json)
from models import MODELS
from parsers import DefaultsHelpFormatter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--data_dir", default="data/train", help="labeled images (Kaggle flat layout or cat/ dog/)")
    # Any registry model: training needs no shipped weights (only ImageNet ones, or none).
    p.add_argument("--models", nargs="+", default=list(SHIPPED_MODELS), choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=15, help="timed optimizer steps per path")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--batch_size", type=int, default=None, help="default: each model's training batch size")
    p.add_argument("--img_size", type=int, default=None, help="default: each model's training size")
    p.add_argument("--naive_workers", type=int, default=2, help="DataLoader workers of the naive path")
    p.add_argument("--decode_sample", type=int, default=1024,
                   help="images decoded to time the project path's one-time decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a few tiny steps on the test fixtures: checks the script, measures nothing")
    p.add_argument("--out", default=None, help="JSON output (default: bench/results/train_throughput.json)")
    args = p.parse_args(argv)
    if args.smoke:
        if args.data_dir == "data/train":
            args.data_dir = FIXTURE_TRAIN
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.batch_size = args.batch_size or 4
        args.img_size = args.img_size or 32
        args.decode_sample = min(args.decode_sample, 8)
        args.naive_workers = 0
    args.out = args.out or default_out("train_throughput", args.smoke)
    return args


class NaiveFiles(object):
    """What a first PyTorch tutorial writes: decode and transform every file on every epoch."""

    def __init__(self, samples, img_size):
        from torchvision import transforms as T
        from models.transforms import IMAGENET_MEAN, IMAGENET_STD
        self.samples = samples
        self.transform = T.Compose([
            T.Resize((img_size, img_size)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        path, label = self.samples[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def timed_steps(model, loader, prepare, warmup, steps, precision="fp32"):
    """Run warmup + steps of train.py's own train_step over one iterator; return (images, seconds) of the timed ones."""
    import torch
    from train import make_optimizer, train_step
    optimizer = make_optimizer("adam", model.parameters(), 1e-4, 0.0, [0.9, 0.999])
    model.train()
    iterator = iter(loader)
    images = 0
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch, labels = next(iterator)
        loss, _ = train_step(model, prepare(batch), labels, optimizer, torch.device("cpu"), precision)
        loss.item()
        if step >= warmup:
            images += len(labels)
    seconds = time.perf_counter() - start
    del iterator
    return images, seconds


def bench_model(conv_net, samples, args, total_images):
    import torch
    from torch.utils.data import DataLoader
    from dataset import DecodedImages, decode_images
    from models import MODELS, build_model
    from models.transforms import train_augment
    from training.hardware import pick_precision
    from train import TrainConfig, prepare_batch

    defaults = TrainConfig()
    spec = MODELS[conv_net]
    img_size = args.img_size or spec.img_size
    batch_size = args.batch_size or spec.batch_size
    needed = (args.warmup + args.steps) * batch_size
    rng = random.Random(args.seed)
    subset = [samples[i % len(samples)] for i in rng.sample(range(len(samples)), min(needed, len(samples)))]
    while len(subset) < needed:  # smoke runs on a handful of fixtures
        subset += subset[:needed - len(subset)]
    device = torch.device("cpu")
    precision = pick_precision(defaults.precision, device)
    result = {"conv_net": conv_net, "img_size": img_size, "batch_size": batch_size, "steps": args.steps,
              "warmup": args.warmup, "precision": precision, "project_workers": defaults.num_workers,
              "naive_workers": args.naive_workers, "default_epochs": spec.epochs}

    # -- naive: decode + resize + ToTensor + Normalize per image per epoch, NCHW fp32
    torch.manual_seed(args.seed)
    model = build_model(conv_net)  # random init: the step costs the same as fine-tuning
    loader = DataLoader(NaiveFiles(subset, img_size), batch_size=batch_size, shuffle=True,
                        num_workers=args.naive_workers, drop_last=True)
    images, seconds = timed_steps(model, loader, lambda b: b, args.warmup, args.steps)
    result["naive_img_s"] = images / seconds
    print("  %s naive: %d images in %.2f s" % (conv_net, images, seconds), file=sys.stderr)
    del model, loader

    # -- project: one-time decode, timed on a sample and projected to the whole folder
    sample = rng.sample(samples, min(len(samples), args.decode_sample))
    with Stopwatch() as sw:
        decode_images(sample, img_size, defaults.num_workers, "decoding (timing sample)")
    result["decode_img_s"] = len(sample) / sw.seconds
    result["decode_sample"] = len(sample)
    result["dataset_images"] = total_images
    result["decode_once_s"] = total_images / result["decode_img_s"]

    # -- project: epochs over the cached tensors (train_main.py's defaults)
    cached, labels, _ = decode_images(subset, img_size, defaults.num_workers, "decoding (training subset)")
    torch.manual_seed(args.seed)
    model = build_model(conv_net).to(memory_format=torch.channels_last)
    loader = DataLoader(DecodedImages(cached, labels, train_augment(img_size)), batch_size=batch_size,
                        shuffle=True, num_workers=defaults.num_workers, drop_last=True)

    images, seconds = timed_steps(model, loader, lambda batch: prepare_batch(batch, device), args.warmup, args.steps,
                                  precision)
    result["project_img_s"] = images / seconds
    print("  %s project: %d images in %.2f s" % (conv_net, images, seconds), file=sys.stderr)

    train_images = round(total_images * (1 - defaults.validation_split))
    epochs = spec.epochs
    amortized_s = result["decode_once_s"] + epochs * train_images / result["project_img_s"]
    naive_s = epochs * train_images / result["naive_img_s"]
    result["train_images"] = train_images
    result["project_amortized_img_s"] = epochs * train_images / amortized_s
    result["speedup_steady"] = result["project_img_s"] / result["naive_img_s"]
    result["speedup_amortized"] = result["project_amortized_img_s"] / result["naive_img_s"]
    result["naive_training_min"] = naive_s / 60
    result["project_training_min"] = amortized_s / 60
    return result


def render(results):
    headers = ["model", "img / batch", "naive img/s", "project img/s (epochs)", "one-time decode",
               "project img/s amortized (epochs)", "speed-up epochs", "speed-up amortized"]
    rows = []
    for r in results:
        rows.append([
            r["conv_net"], "%d px / %d" % (r["img_size"], r["batch_size"]), fmt(r["naive_img_s"]),
            fmt(r["project_img_s"]),
            "%s s (%d img at %s img/s)" % (fmt(r["decode_once_s"]), r["dataset_images"], fmt(r["decode_img_s"], 0)),
            "%s (%d)" % (fmt(r["project_amortized_img_s"]), r["default_epochs"]),
            "%.2fx" % r["speedup_steady"], "%.2fx" % r["speedup_amortized"],
        ])
    return markdown_table(headers, rows)


def main(argv=None):
    args = parse_args(argv)
    from dataset import find_labeled_images
    _, samples = find_labeled_images(args.data_dir)
    info = machine_info()
    print("machine: %s" % describe_machine(info), file=sys.stderr)
    results = []
    for conv_net in args.models:
        print("%s ..." % conv_net, file=sys.stderr)
        results.append(bench_model(conv_net, samples, args, len(samples)))
    print()
    print("Training throughput, images/s (%d timed steps after %d warm-up; %s)" % (
        args.steps, args.warmup, "SMOKE RUN, not a measurement" if args.smoke else "fp32 unless noted"))
    print()
    print(render(results))
    print()
    for r in results:
        print("%s: project/naive %.2fx per epoch, %.2fx including the one-time decode over %d epochs "
              "(a full default training run: naive %.1f min, project %.1f min)" % (
                  r["conv_net"], r["speedup_steady"], r["speedup_amortized"], r["default_epochs"],
                  r["naive_training_min"], r["project_training_min"]))
    write_json(args.out, {"benchmark": "train_throughput", "smoke": args.smoke, "machine": info,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results})
    return results


if __name__ == "__main__":
    main()

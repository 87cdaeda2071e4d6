"""Train a Dogs-vs-Cats classifier: `python train_main.py --conv_net efficientnet_lite0`."""
import os
import sys
from dataclasses import asdict

import torch

from dataset import DataError, DecodedImages, decode_images, find_labeled_images, stratified_split
from models import CLASSES, MODELS, PretrainedWeightsError, build_model, set_serving_size, smallest_img_size
from models.transforms import train_augment
from parsers import fail, pick_device
from parsers.train_parser import build_parser
from train import TrainConfig, Trainer, make_optimizer, warmup_cosine


# Flags whose default is the model's own (models.MODELS), used wherever the flag was not given.
PER_MODEL_DEFAULTS = ("epochs", "lr", "optimizer", "weight_decay", "batch_size", "dropout", "img_size")


def resolve_defaults(config):
    spec = MODELS[config.conv_net]
    config.model_path = config.model_path or spec.default_model_path
    for name in PER_MODEL_DEFAULTS:
        if getattr(config, name) is None:
            setattr(config, name, getattr(spec, name))
    config.eval_img_size = config.eval_img_size or (spec.eval_img_size if config.img_size == spec.img_size
                                                    else None) or config.img_size
    return config


def cpu_has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def pick_precision(name, device):
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_amx() else "fp32"  # measured: bf16 is ~6x slower than fp32 on AVX2-only CPUs


def load_data(config):
    """Find, split and decode the images; every data problem surfaces here, before training."""
    samples = find_labeled_images(config.data_dir)
    train, val = stratified_split(samples, config.validation_split, config.seed)
    if config.dry_run:
        train, val = train[:4 * config.batch_size], val[:config.batch_size]
    print("%s: %d training images at %d px, %d validation images at %d px" % (
        config.data_dir, len(train), config.img_size, len(val), config.eval_img_size), file=sys.stderr)
    workers = config.num_workers
    train_x, train_y, _ = decode_images(train, config.img_size, workers, "decoding training images")
    train_set = DecodedImages(train_x, train_y, train_augment(config.img_size))
    val_set = None
    if val:
        val_x, val_y, _ = decode_images(val, config.eval_img_size, workers, "decoding validation images")
        val_set = DecodedImages(val_x, val_y)
    return train_set, val_set


def check_img_sizes(config):
    """Refuse an image size the model cannot take before spending minutes decoding images."""
    minimum = smallest_img_size(config.conv_net)
    for flag, size in (("--img_size", config.img_size), ("--eval_img_size", config.eval_img_size)):
        if size < minimum:
            fail("%s %d is too small for %s: it needs at least %d px" % (flag, size, config.conv_net, minimum))


def build_trainer(config):
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    check_img_sizes(config)
    torch.manual_seed(config.seed)
    train_set, val_set = load_data(config)
    model = build_model(config.conv_net, config.dropout, pretrained=not config.random_init,
                        pretrained_weights=config.pretrained_weights)
    set_serving_size(model, config.eval_img_size)
    model = model.to(device).to(memory_format=torch.channels_last)  # NHWC: ~2x faster convolutions on CPU
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay, config.betas)
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, min(total // 10, steps_per_epoch)))
    # img_size is what prediction and serving feed the model; train_img_size what it trained on.
    meta = dict(conv_net=config.conv_net, img_size=config.eval_img_size, train_img_size=config.img_size,
                classes=list(CLASSES),
                dropout=config.dropout, precision=precision, args=asdict(config))
    print("training %s on %s (%s) for %d epochs" % (config.conv_net, device, precision, config.epochs),
          file=sys.stderr)
    return Trainer(model, optimizer, scheduler, train_set, val_set, config, meta, device, precision)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = resolve_defaults(TrainConfig(**vars(args)))
    try:
        trainer = build_trainer(config)
        if config.resume:
            if not os.path.exists(trainer.paths["resume"]):
                fail("--resume: no checkpoint at %s" % trainer.paths["resume"])
            trainer.resume()
        trainer.fit()
    except (DataError, PretrainedWeightsError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted; the best model so far is at %s (continue with --resume)" % config.model_path,
              file=sys.stderr)
        sys.exit(130)
    print("best model: %s" % config.model_path)


if __name__ == "__main__":
    main()

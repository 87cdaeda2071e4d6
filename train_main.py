"""Train a Dogs-vs-Cats classifier: `python train_main.py --conv_net efficientnet_lite0`.

On several processes: `torchrun --nproc_per_node 2 train_main.py ...` (docs/scaling.md).
"""
import os
import sys
from dataclasses import asdict, fields

import torch

from training.calibration import describe as describe_calibration
from dataset import (DataError, DecodedImages, balance_warning, class_counts, data_fingerprint, decode_images,
                     find_labeled_images, training_samples)
from training.distributed import Cluster, setup
from training.hardware import pick_precision
from models import MODELS, PretrainedWeightsError, build_model, set_serving_size, smallest_img_size
from models.checkpoint import CheckpointError, check_writable
from models.transforms import train_augment
from parsers import fail, pick_device
from parsers.train_parser import SPEC_FIELDS, build_parser
from train import (TrainConfig, Trainer, carried_calibration, check_same_classes, check_same_run, make_optimizer,
                   read_resume_state, resume_path, warmup_cosine)

# The flags whose default is the model's own: those named like a field of models.ModelSpec.
PER_MODEL_DEFAULTS = tuple(f.name for f in fields(TrainConfig) if f.name in SPEC_FIELDS)


def resolve_defaults(config):
    """Fill in every flag left unset (None) with the model's own value from models.MODELS."""
    spec = MODELS[config.conv_net]
    config.model_path = config.model_path or spec.run_model_path
    if config.eval_img_size is None and config.img_size not in (None, spec.img_size):
        config.eval_img_size = config.img_size  # the registry's evaluation size goes with its training size
    for name in PER_MODEL_DEFAULTS:
        if getattr(config, name) is None:
            setattr(config, name, getattr(spec, name))
    return config


def find_data(config):
    """(classes, all labeled samples, train, val) of --data_dir, listed once: its classes come from the data
    (dataset.find_labeled_images). A layout problem is a DataError here, before the model is built."""
    classes, samples = find_labeled_images(config.data_dir)
    train, val = training_samples(config.data_dir, config.validation_split, config.seed, config.dry_run,
                                  config.batch_size, samples)
    return classes, samples, train, val


def load_data(config, cluster, classes, train, val):
    """Decode the images of the split; every image problem surfaces here, before training."""
    if cluster.is_main:  # the same on every rank: said once
        counts = class_counts(classes, train)
        print("%s: %d classes (%s)" % (config.data_dir, len(classes),
                                       ", ".join("%s %d" % kv for kv in counts.items())), file=sys.stderr)
        warning = balance_warning(classes, train)
        if warning:
            print("warning: " + warning, file=sys.stderr)
    print("%s: %d training images at %d px, %d validation images at %d px" % (
        config.data_dir, len(train), config.img_size, len(val), config.eval_img_size), file=sys.stderr)
    workers = config.num_workers
    # Under torchrun every rank needs every training image: DistributedSampler deals a new
    # permutation of all of them out to the ranks each epoch. So each rank decodes only its
    # 1/N share and the ranks exchange the decoded shares (gather_rows): N ranks on a host
    # decode each image once, not N times, and every rank ends with the uint8 cache one
    # process would have (in rank order, which the sampler's shuffling makes irrelevant).
    # Fixed per-rank shards would also divide the cache's memory by N, but tie each image
    # to one rank for the whole run. Validation needs no exchange: each rank scores, and
    # so decodes, only its own share. In a single process the share is everything.
    train_x, train_y, _ = decode_images(cluster.shard(train), config.img_size, workers, "decoding training images")
    train_set = DecodedImages(cluster.gather_rows(train_x), cluster.gather_rows(train_y),
                              train_augment(config.img_size))
    val_set = None
    if val:
        val_set = decode_share(cluster.shard(val), config.eval_img_size, workers, "decoding validation images")
    return train_set, val_set


def decode_share(samples, img_size, workers, desc):
    """The decoded images of a rank's share; with fewer images than ranks a share can be empty."""
    if not samples:
        return DecodedImages(torch.zeros((0, 3, img_size, img_size), dtype=torch.uint8),
                             torch.zeros(0, dtype=torch.long))
    images, labels, _ = decode_images(samples, img_size, workers, desc)
    return DecodedImages(images, labels)


def check_img_sizes(config):
    """Refuse an image size the model cannot take before spending minutes decoding images."""
    minimum = smallest_img_size(config.conv_net)
    for flag, size in (("--img_size", config.img_size), ("--eval_img_size", config.eval_img_size)):
        if size < minimum:
            fail("%s %d is too small for %s: it needs at least %d px" % (flag, size, config.conv_net, minimum))


def check_files(config):
    """Read the --resume checkpoint, check --calibration_from and that --model_path can be written, before
    minutes of decoding.

    Returns the state to resume from (None without --resume); raises CheckpointError.
    """
    state = None
    if config.resume:
        path = resume_path(config.model_path)
        state = read_resume_state(path)
        check_same_run(state, config, path)  # Trainer.resume checks it too; here it is found before decoding
    if config.calibration_from:
        carried_calibration(config)  # Trainer.calibrate reads it after the last epoch; a mistake shows now
    check_writable(config.model_path, "choose another --model_path")
    return state


def restart_state(config, cluster):
    """After torchrun restarted the group (--max-restarts): the checkpoint this same command wrote, if
    there is one, so the new processes go on from its last finished epoch instead of starting over.

    Decided together: torchrun counts restarts per host (a host whose processes did not fail
    says 0), and all ranks must start from the same epoch, or none resumes."""
    path = resume_path(config.model_path)
    state = None
    if cluster.somewhere(cluster.restarts > 0) and os.path.exists(path):
        state = read_resume_state(path)
        state = state if state.get("args") == asdict(config) else None
    return state if cluster.everywhere(state is not None) else None


def build_trainer(config, cluster=None, resume_state=None):
    """The Trainer of `config`; with `resume_state` (read_resume_state's), one that goes on from it, which must
    have been trained on the classes --data_dir holds now (checked before any image is decoded)."""
    cluster = cluster or Cluster(pick_device(config.device))
    device = cluster.device
    precision = pick_precision(config.precision, device)
    check_img_sizes(config)
    classes, samples, train, val = find_data(config)
    if resume_state is not None:
        check_same_classes(resume_state, classes, resume_path(config.model_path))
    torch.manual_seed(config.seed)
    # The model before decoding: pretrained weights that cannot be had (VGG offline) stop the run first.
    model = build_model(config.conv_net, config.dropout, pretrained=not config.random_init,
                        pretrained_weights=config.pretrained_weights, classes=classes)
    train_set, val_set = load_data(config, cluster, classes, train, val)
    set_serving_size(model, config.eval_img_size)
    model = model.to(device).to(memory_format=torch.channels_last)  # NHWC: ~2x faster convolutions on CPU
    model = cluster.sync_batchnorm(model)  # CUDA under torchrun only
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay, config.betas)
    steps_per_epoch = -(-cluster.samples_per_rank(len(train_set)) // config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, min(total // 10, steps_per_epoch)))
    # img_size is what prediction and serving feed the model; train_img_size what it trained on.
    meta = dict(conv_net=config.conv_net, img_size=config.eval_img_size, train_img_size=config.img_size,
                classes=list(classes), data=data_fingerprint(config.data_dir, samples),
                dropout=config.dropout, precision=precision, args=asdict(config), world_size=cluster.world_size)
    print("training %s on %s (%s) for %d epochs%s" % (
        config.conv_net, device, precision, config.epochs, ", %d processes x batch %d" % (
            cluster.world_size, config.batch_size) if cluster.distributed else ""), file=sys.stderr)
    return Trainer(model, optimizer, scheduler, train_set, val_set, config, meta, device, precision, cluster)


def main(argv=None):
    args = build_parser().parse_args(argv)
    config = resolve_defaults(TrainConfig(**vars(args)))
    cluster = setup(config.device)  # torchrun's process group; a single process otherwise
    try:
        resume_state = check_files(config) or restart_state(config, cluster)
        trainer = build_trainer(config, cluster, resume_state)
        if resume_state is not None:
            trainer.resume(resume_state)
        trainer.fit()
        report = trainer.calibrate()
        if report is not None:
            print(describe_calibration(report), file=sys.stderr)
        cluster.close()
    except (DataError, PretrainedWeightsError, CheckpointError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted; the best model so far is at %s (continue with --resume)" % config.model_path,
              file=sys.stderr)
        sys.exit(130)
    print("best model: %s" % config.model_path)


if __name__ == "__main__":
    main()

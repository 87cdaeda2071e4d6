"""What every command line shares: user errors are one line `error: ...` and exit code 2."""
import argparse
import sys

import torch


def fail(message):
    """One line on stderr and exit code 2: bad input is the user's to fix, not a traceback."""
    print("error: %s" % message, file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    """--device auto|cpu|cuda -> torch.device; asking for a missing GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag is one line `error: ...` and exit code 2, like every other user error."""

    def error(self, message):
        print("error: %s (see --help)" % message, file=sys.stderr)
        sys.exit(2)


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a positive integer, got %r" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer, got %s" % text)
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a non-negative integer, got %r" % text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be a non-negative integer, got %s" % text)
    return value

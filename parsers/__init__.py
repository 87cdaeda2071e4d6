"""What every command line shares: user errors are one line `error: ...` and exit code 2."""
import argparse
import sys

import torch

# Where the README unpacks Kaggle's train.zip: training's default --data_dir, and where evaluation
# looks for training's split when the folder a checkpoint recorded is not on this machine.
DEFAULT_DATA_DIR = "data/train"


def add_conv_net(p, help, add=None):
    """--conv_net: a registry name, the original README's base_cnn by default (one definition for every command).
    add: the parser's add_argument, or a wrapper of it (train_parser's flag)."""
    from models import DEFAULT_CONV_NET, MODELS
    return (add or p.add_argument)("--conv_net", choices=sorted(MODELS), default=DEFAULT_CONV_NET, help=help)


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


def int_at_least(minimum, what):
    """An argparse type: an integer >= minimum; anything else is a one-line error naming `what`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError("must be a %s integer, got %r" % (what, text))
        return value
    parse.__name__ = "%s integer" % what  # argparse names the type in its own messages
    return parse


def unit_fraction(text):
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be a number in [0, 1), got %r" % text)
    return value


unit_fraction.__name__ = "number in [0, 1)"

positive_int = int_at_least(1, "positive")
non_negative_int = int_at_least(0, "non-negative")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show '(default: X)' only where there is a single default; per-model defaults say so in their help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

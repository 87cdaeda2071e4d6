"""train_main.py as torchrun runs it, plus one thing for tests/test_distributed.py to check.

    torchrun --standalone --nproc_per_node 2 tests/ddp_probe.py DIGEST_DIR <train_main.py flags>

Runs train_main.main() on the flags unchanged; when training is done, every rank writes
the SHA-256 of each tensor of the weights it holds (parameters and buffers, and with
--ema_decay those of the weight average, as ema.*) to
DIGEST_DIR/rank<RANK>.json. Rank 0 alone writes files, so this is how the test sees the
weights of the other ranks; the production code has no such hook.
"""
import hashlib
import json
import os
import sys
import torch

import train  # the repository root is on PYTHONPATH: tests/test_distributed.py runs this from it
import train_main


def digests(state_dict):
    return {name: hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, tensor in state_dict.items() if isinstance(tensor, torch.Tensor)}  # not the class names


def main():
    digest_dir, argv = sys.argv[1], sys.argv[2:]
    fit = train.Trainer.fit

    def fit_then_write_digests(trainer):
        history = fit(trainer)
        path = os.path.join(digest_dir, "rank%s.json" % os.environ.get("RANK", "0"))
        held = dict(trainer.model.state_dict())
        if trainer.ema is not None:  # --ema_decay: the weight average each rank keeps
            held.update(("ema." + k, v) for k, v in trainer.ema.state_dict().items())
        with open(path, "w") as f:
            json.dump(digests(held), f)
        return history

    train.Trainer.fit = fit_then_write_digests
    train_main.main(argv)


if __name__ == "__main__":
    main()

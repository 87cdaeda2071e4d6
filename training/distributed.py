"""Training on several processes with torchrun: DistributedDataParallel, rank 0 writes.

    torchrun --standalone --nproc_per_node 2 train_main.py --conv_net base_cnn --data_dir data/train

torchrun starts the processes and tells each one its RANK, LOCAL_RANK and WORLD_SIZE
in the environment. Started any other way (no WORLD_SIZE, or a WORLD_SIZE of 1) a
process is a `Cluster()` of one, whose every method below returns its input or does
nothing: plain `python train_main.py` trains exactly as it does without this module.
docs/scaling.md has the commands for one and several hosts.
"""
import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from parsers import fail, pick_device

# How long a collective may wait for the other processes before it raises. A process
# that dies is noticed by torchrun at once, which stops the others (or restarts them
# all, with --max-restarts); this bounds the wait for one that hangs instead. The
# longest wait in a healthy run is rank 0 writing the checkpoint and curves, seconds.
TIMEOUT = datetime.timedelta(minutes=10)


class Cluster:
    """This process's place among the training processes."""

    def __init__(self, device, rank=0, world_size=1, restarts=0):
        self.device, self.rank, self.world_size, self.restarts = device, rank, world_size, restarts

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        """The process that writes files and prints progress."""
        return self.rank == 0

    def seed(self, seed):
        """A seed of this rank's own (dropout, augmentation), and `seed` itself in a single process."""
        return seed * self.world_size + self.rank

    def shard(self, items):
        """This rank's strided share of a list: every item goes to exactly one rank, none twice."""
        return items[self.rank::self.world_size]

    def samples_per_rank(self, n):
        """How many of n training samples each rank gets per epoch (DistributedSampler pads to equal shares)."""
        return -(-n // self.world_size)

    def sampler(self, dataset, seed, epoch):
        """The training sampler of one epoch: None (the DataLoader shuffles) in a single process."""
        if not self.distributed:
            return None
        sampler = DistributedSampler(dataset, self.world_size, self.rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)  # a new permutation across ranks every epoch
        return sampler

    def sync_batchnorm(self, model):
        # SyncBatchNorm normalizes a batch with the statistics of every rank's part of it,
        # so N processes of batch B normalize like one process of batch N x B. CUDA only:
        # PyTorch implements it for GPU-type devices, and its training forward on a CPU
        # tensor raises ValueError ("SyncBatchNorm expected input tensor to be on GPU").
        # On CPU each rank's BatchNorm normalizes with its own B images (plain DDP), and
        # sync_buffers() keeps the running statistics equal on every rank.
        if self.distributed and self.device.type == "cuda":
            return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model):
        """The module to train: DistributedDataParallel (gradients averaged over ranks) or `model` itself."""
        if not self.distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def sync_buffers(self, model):
        """Rank 0's buffers (BatchNorm running statistics) on every rank, as DDP does before each forward:
        after an epoch's last step each rank holds those of its own last batch."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)

    def somewhere(self, flag):
        """Whether `flag` holds on at least one rank: the same answer on every rank."""
        return self._agree(flag, dist.ReduceOp.MAX)

    def everywhere(self, flag):
        """Whether `flag` holds on every rank: the same answer on every rank."""
        return self._agree(flag, dist.ReduceOp.MIN)

    def _agree(self, flag, op):
        if not self.distributed:
            return bool(flag)
        tensor = torch.tensor([int(bool(flag))])
        dist.all_reduce(tensor, op=op)
        return bool(tensor.item())

    def mean(self, *values):
        """The mean over ranks of each value (the same figures on every rank)."""
        if not self.distributed:
            return values
        return tuple(v / self.world_size for v in self.sum(*values))

    def sum(self, *values):
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)  # a CPU tensor: gloo, even beside NCCL
        dist.all_reduce(tensor)
        return tuple(tensor.tolist())

    def gather_rows(self, tensor):
        """Every rank's `tensor`, concatenated along dim 0 in rank order, on every rank.

        Each share is broadcast straight into its slice of the result, so a rank holds the
        result and its own share, never N padded copies."""
        if not self.distributed:
            return tensor
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(tensor)]))
        sizes = [int(s) for s in sizes]
        out = torch.empty((sum(sizes),) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
        start = 0
        for src, size in enumerate(sizes):
            part = out[start:start + size]
            if src == self.rank:
                part.copy_(tensor)
            if size:
                dist.broadcast(part, src=src)
            start += size
        return out

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


class _ProblemsOnly:
    """stderr of the ranks other than 0: their warnings and errors, with the rank in front.

    Rank 0 prints the progress bars and the progress lines; the others would print the
    same ones over them. What is theirs alone (an image of their share that could not
    be decoded) still shows. Tracebacks go to the real stderr (see quiet_unless_main)."""

    def __init__(self, stream, rank):
        self.stream, self.rank, self.pending = stream, rank, ""

    def write(self, text):
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1]  # a progress bar redraws its line after a carriage return
            if line.startswith(("warning:", "error:")):
                self.stream.write("[rank %d] %s\n" % (self.rank, line))
                self.stream.flush()
        self.pending = self.pending.rsplit("\r", 1)[-1]
        return len(text)

    def flush(self):
        self.stream.flush()

    def isatty(self):
        return False

    def fileno(self):  # for code that writes to the descriptor itself (faulthandler, C++ warnings do too)
        return self.stream.fileno()

    @property
    def encoding(self):
        return self.stream.encoding


def quiet_unless_main(rank):
    """Ranks other than 0: no stdout (epoch lines), stderr through _ProblemsOnly, tracebacks as usual."""
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _ProblemsOnly(sys.__stderr__, rank)
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


def setup(device_name):
    """Join torchrun's process group when there is one; a single-process Cluster otherwise."""
    device = pick_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Cluster(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":  # one GPU per process: the LOCAL_RANK-th of this host
        if local_rank >= torch.cuda.device_count():
            fail("torchrun started %s processes on this host but it has %d GPU(s): use --nproc_per_node %d "
                 "(or --device cpu)" % (os.environ.get("LOCAL_WORLD_SIZE", "more"), torch.cuda.device_count(),
                                        torch.cuda.device_count()))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # NCCL for the CUDA tensors (gradients), gloo for the few CPU ones (metrics, decoded images).
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Seen here with torch 2.14 and gloo: a group that torchrun restarts in the rendezvous
        # store of the group that failed (torchrun shares its own store by default) hangs in
        # ProcessGroupGloo's constructor, past TIMEOUT (pytorch/pytorch#135712 is the same
        # trouble with NCCL). With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every group gets a new
        # store and restarts work. Without it, fail at once rather than hang.
        fix = "run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment (docs/scaling.md)"
        if restarts:
            fail("torchrun restarted the processes in the rendezvous store of the ones that failed, where they "
                 "would hang; %s" % fix)
        if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
            print("warning: --max-restarts cannot restart the processes: %s" % fix, file=sys.stderr)
    dist.init_process_group(backend, timeout=TIMEOUT)
    if rank:
        quiet_unless_main(rank)
    return Cluster(device, rank, world_size, restarts)

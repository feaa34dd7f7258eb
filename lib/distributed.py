"""Process group and device setup in one place, with a single-process fallback, and the
global batch of distributed training.

Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): nccl on CUDA, gloo on CPU, one device
per rank. Otherwise: one process on --device (default CUDA when present, else CPU).

Distributed training computes the same loss as one process with the whole (global) batch:
every rank encodes its share, GlobalBatch gathers the embeddings and local features of all
ranks (with gradient), and every rank computes the identical global loss. Gradient scale:
all_gather's backward sums the W ranks' (identical) gradients of the gathered tensors, so a
rank's local embeddings receive W x dL/d(local); DDP then averages over W, which leaves
exactly dL/d(theta), as in one process.
"""
import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lib.errors import UserError

# The suggested replacement lives in a private module (torch.distributed._functional_collectives);
# the public autograd all_gather works with nccl and gloo alike.
warnings.filterwarnings('ignore', message='torch.distributed.nn.functional.all_gather is deprecated',
                        category=FutureWarning)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def pick_device(name=None, local_rank=0):
    if name is None:
        return torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'--device {name} was asked for, but no CUDA GPU is visible; use --device cpu')
        if device.index is None:
            device = torch.device('cuda', local_rank)
    return device


# How long a collective waits for the other ranks before it fails. Rank 0 validates, tests and
# saves alone while the others wait in a barrier, so this must exceed the longest validation plus
# save (a few minutes for COCO's 5K test on one GPU). A rank that dies is noticed at once by gloo
# (its TCP connections close); this bounds only a rank that hangs, or a launch without torchrun's
# agent (srun starting every rank) where nothing else stops the waiting ranks.
TIMEOUT_ENV = 'HREM_DIST_TIMEOUT'  # minutes
DEFAULT_TIMEOUT_MIN = 30


def collective_timeout():
    value = os.environ.get(TIMEOUT_ENV, '')
    if not value:
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1
    if not minutes > 0:
        raise UserError(f'{TIMEOUT_ENV}={value!r}: give the collective timeout in minutes (> 0), e.g. '
                        f'{TIMEOUT_ENV}=120 when validating on rank 0 takes longer than {DEFAULT_TIMEOUT_MIN} minutes')
    return datetime.timedelta(minutes=minutes)


def init_distributed(device_name=None):
    """Set up the process group when launched by torchrun; return this process's DistEnv."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return DistEnv(0, 1, 0, pick_device(device_name))
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    device = pick_device(device_name, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                rank=rank, world_size=world_size, timeout=collective_timeout(),
                                **({'device_id': device} if device.type == 'cuda' else {}))
    return DistEnv(rank, world_size, local_rank, device)


def barrier(env):
    if env.distributed:
        dist.barrier()


def cleanup(env):
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_finite(loss, env):
    """True when the loss is finite on every rank, so that all ranks skip a step together."""
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if env.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def all_max(values, env):
    """The element-wise maximum over ranks of a few integers: every rank takes the same decision."""
    if not env.distributed:
        return list(values)
    out = torch.tensor(values, dtype=torch.int64, device=env.device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.tolist()


def all_gather_objects(obj, env):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class GlobalBatch:
    """What HREM.forward needs to see the global batch on every rank.

    - pad_batch: ranks pad regions and token ids to the same (global maximum) sizes before the
      encoders, as one process pads the whole batch: padded regions enter BatchNorm and the
      relation module, and word positions up to max(K, length) enter the relation module;
    - __call__: all_gather with gradient (rank order), so the losses see all B pairs;
    - shared_rng: the global part of the forward (relation dropout, the trip loss's negative
      sampling) draws from a stream seeded by (seed, step) that is the same on every rank, so
      every rank computes the identical loss and the same skip decision.
    """

    def __init__(self, env, seed=0):
        self.env, self.seed = env, seed

    def pad_batch(self, batch):
        sizes = torch.tensor([batch['regions'].shape[1], batch['tokens'].shape[1]], device=batch['tokens'].device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        n_regions, n_tokens = sizes.tolist()
        return {**batch,
                'regions': F.pad(batch['regions'], (0, 0, 0, n_regions - batch['regions'].shape[1])),
                'tokens': F.pad(batch['tokens'], (0, n_tokens - batch['tokens'].shape[1]))}

    def __call__(self, *tensors):
        """Each rank's tensors -> the global ones, in rank order; None stays None."""
        def gather(x):
            if x is None:
                return None
            if x.is_floating_point():
                return torch.cat(dist_autograd.all_gather(x))
            parts = [torch.empty_like(x) for _ in range(self.env.world_size)]  # integers carry no gradient
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)

        return tuple(gather(x) for x in tensors)

    @contextlib.contextmanager
    def shared_rng(self, step):
        cuda = self.env.device.type == 'cuda'
        with torch.random.fork_rng(devices=[self.env.device] if cuda else []):
            seed = int(np.random.SeedSequence([self.seed, step]).generate_state(1)[0])
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)  # this rank's device only
            yield


def wrap_ddp(model, env, seed=0):
    """DistributedDataParallel around the model (SyncBatchNorm on CUDA) and its GlobalBatch.

    On CPU, SyncBatchNorm is not supported: BatchNorm normalises with each rank's statistics
    (the running statistics are rank 0's, broadcast by DDP), the one difference from one process.
    The relation module is idle before --warmup, hence find_unused_parameters.
    """
    if env.device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place: same parameters
        ddp = DistributedDataParallel(model, device_ids=[env.device], find_unused_parameters=True)
    else:
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
    return ddp, GlobalBatch(env, seed)

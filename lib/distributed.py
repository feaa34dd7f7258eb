"""Process group and device setup in one place, with a single-process fallback.

Launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): nccl on CUDA, gloo on CPU, one device
per rank. Otherwise: one process on --device (default CUDA when present, else CPU).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lib.errors import UserError


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
                                rank=rank, world_size=world_size,
                                **({'device_id': device} if device.type == 'cuda' else {}))
    return DistEnv(rank, world_size, local_rank, device)


def barrier(env):
    if env.distributed:
        dist.barrier()


def cleanup(env):
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()

"""Mixed precision behind one switch (--precision fp32 | bf16 | fp16).

Autocast covers the encoders; losses, relations and ranking are computed in fp32 by their
callers. fp16 needs a GradScaler; bf16 and fp32 do not.
"""
import contextlib

import torch

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def autocast(device, precision):
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device, precision):
    return torch.amp.GradScaler(device.type, enabled=precision == 'fp16')

"""Mixed precision behind one switch (--precision fp32 | bf16 | fp16).

Autocast covers the encoders; losses, relations and ranking are computed in fp32 by their
callers. fp16 needs a GradScaler; bf16 and fp32 do not.

fp16 is refused on CPU: CPUs have no fp16 matrix units (it is slower than fp32 there) and
fp16's small range is what the GradScaler works around; bf16 is the CPU's reduced precision.
"""
import contextlib

import torch

from lib.errors import UserError

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def check_precision(device, precision):
    if precision == 'fp16' and device.type == 'cpu':
        raise UserError('--precision fp16 needs a CUDA GPU; on CPU use --precision bf16 or fp32')
    if precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError(f'--precision bf16 is not supported by the GPU {device}; use --precision fp16 or fp32')


def autocast(device, precision):
    check_precision(device, precision)
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device, precision):
    check_precision(device, precision)
    return torch.amp.GradScaler(device.type, enabled=precision == 'fp16')


def set_tf32(device, enabled):
    """--tf32: fp32 matrix products on CUDA tensor cores with TF32 inputs (10-bit mantissa).

    Faster on Ampere and later GPUs, but results change slightly, hence off by default. It is a
    process-wide switch, so evaluation encodes under it too. CPUs have no TF32.
    """
    if not enabled:
        return
    if device.type != 'cuda':
        raise UserError('--tf32 is a CUDA matrix-product mode; drop it on CPU (fp32 products stay exact fp32)')
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, 'fp32_precision'):  # torch >= 2.9
        matmul.fp32_precision = 'tf32'
    else:
        matmul.allow_tf32 = True

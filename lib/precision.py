"""Mixed precision behind one switch (--precision fp32 | bf16 | fp16).

Autocast covers the encoders; losses, relations and ranking are computed in fp32 by their
callers. fp16 needs a GradScaler; bf16 and fp32 do not.

fp16 is refused on CPU: CPUs have no fp16 matrix units (it is slower than fp32 there) and
fp16's small range is what the GradScaler works around; bf16 is the CPU's reduced precision.
"""
import contextlib
import platform

import torch

from lib.errors import UserError

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def check_precision(device, precision):
    if precision == 'fp16' and device.type == 'cpu':
        raise UserError('--precision fp16 needs a CUDA GPU; on CPU use --precision bf16 or fp32')
    if precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UserError(f'--precision bf16 is not supported by the GPU {device}; use --precision fp16 or fp32')


def cpu_bf16_flags():
    """What torch reports about this CPU's bf16 instructions (private torch.cpu probes, present
    since torch 2.1; a probe that is missing reads as False)."""
    def probe(name):
        fn = getattr(torch.cpu, name, None)
        return bool(fn()) if fn is not None else False
    arm = platform.machine().lower() in ('aarch64', 'arm64')
    return {'amx_bf16': probe('_is_amx_tile_supported'), 'avx512_bf16': probe('_is_avx512_bf16_supported'),
            # on ARM, oneDNN's bf16 check is the CPU's BF16 extension (on x86 it also accepts plain AVX512)
            'arm_bf16': arm and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def bf16_units(flags):
    """The name of the CPU's bf16 matrix instructions, or None when it has none (bf16 is then
    emulated in software or converted to fp32, and slower than fp32)."""
    for key, name in (('amx_bf16', 'AMX-BF16'), ('avx512_bf16', 'AVX512-BF16'), ('arm_bf16', 'ARM BF16')):
        if flags.get(key):
            return name
    return None


def bf16_support(device, flags=None):
    """What does bf16 on this device rest on: 'cuda', the CPU's instructions, or None."""
    if device.type == 'cuda':
        return 'cuda' if torch.cuda.is_bf16_supported() else None
    return bf16_units(cpu_bf16_flags() if flags is None else flags)


def bf16_warning(device, precision, flags=None):
    """One line for --precision bf16 on a CPU without bf16 instructions, else None."""
    if precision != 'bf16' or device.type != 'cpu' or bf16_support(device, flags):
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (f'--precision bf16: this CPU has no bf16 matrix instructions (no AVX512-BF16, AMX or ARM BF16; '
            f'torch uses {capability}), so bf16 is emulated and slower than fp32 here; use --precision fp32')


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

"""--compile: torch.compile of the two encoders, in place (checkpoints keep their keys)."""
import random

import torch

from lib.errors import UserError


def check_compile(device):
    """Compile and run a tiny function on `device`, so that a missing backend (no C++ compiler
    for CPU code, no Triton for CUDA) stops the run before any data is read, with one message."""
    scale = 1.0 + random.random()  # a constant of its own: the kernel is built now, not read from a cache
    probe = torch.compile(lambda x: torch.relu(x) * scale + 1.0, fullgraph=True, dynamic=False)
    try:
        import torch._inductor.config as inductor_config
        with inductor_config.patch(fx_graph_cache=False):
            probe(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001 - the backends fail in many ways (missing compiler, Triton, Python version)
        reason = str(err).strip().splitlines()
        raise UserError(f'--compile: torch.compile cannot build code for {device.type} on this machine '
                        f'({type(err).__name__}: {reason[0] if reason else ""}). On CPU it needs a C++ compiler '
                        '(g++, or the one named by $CXX), on CUDA the triton package; install it or drop --compile') from err


def compile_encoders(model):
    """torch.compile the image and text encoders in place.

    dynamic=True: the number of regions (region dropout) and of tokens (caption lengths) changes
    from batch to batch, and each new size would otherwise compile the encoders again.
    """
    model.img_enc.compile(dynamic=True)
    model.txt_enc.compile(dynamic=True)

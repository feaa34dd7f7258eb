"""What an exact mid-epoch resume and a clean stop on a scheduler's signal need.

- OffsetSampler: an epoch's shuffled order from a given item on; skipped items are never read.
- rng_state / set_rng_state: the random streams of a process, as plain values a checkpoint holds.
- StopSignals: SIGTERM/SIGINT ask the run to stop after its current step; another one, later,
  acts at once.
- CheckpointSchedule: when a mid-epoch checkpoint is due (every N steps, every M minutes).
"""
import itertools
import logging
import os
import random
import signal
import threading
import time

import numpy as np
import torch
from torch.utils.data import DistributedSampler

logger = logging.getLogger('hrem')

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Launchers deliver one request more than once: SLURM signals every process of a job step and
# torchrun forwards its own SIGTERM (also on Ctrl-C), so a rank sees two within milliseconds.
# Only a signal later than this counts as a second, "exit now" request.
REPEAT_WINDOW_S = 1.0


class OffsetSampler(DistributedSampler):
    """DistributedSampler whose epoch starts at item `start` of this rank's share: the items
    before it are never handed to the DataLoader, so no worker reads them."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def rng_state(device):
    """This process's torch (and CUDA), numpy and python random states, as checkpoint values."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state(device) if device.type == 'cuda' else None,
            'numpy': [name, key.tolist(), pos, has_gauss, gauss], 'python': random.getstate()}


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'], device)
    name, key, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state['python'])


class StopSignals:
    """While entered: the first SIGTERM/SIGINT sets `signum` (the run stops after its current
    step); one more than REPEAT_WINDOW_S later restores the previous handlers and re-delivers
    itself, so it acts at once (SIGTERM ends the process, SIGINT raises KeyboardInterrupt).
    Handlers can only be installed in the main thread; elsewhere this does nothing."""

    def __init__(self):
        self.signum = 0
        self._first = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        self._restore()

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}

    def _handle(self, signum, frame):
        if not self.signum:
            self.signum, self._first = signum, time.monotonic()
            logger.warning(f'received {signal.Signals(signum).name}: stopping after this step with a checkpoint '
                           '(send it again to stop at once)')
        elif time.monotonic() - self._first > REPEAT_WINDOW_S:
            self._restore()
            signal.raise_signal(signum)


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn: Ctrl-C and SLURM signal every process, but stopping is the main
    process's job (a worker that died of the signal would fail the step being finished). A SIGTERM
    from the worker's parent (the DataLoader's and multiprocessing's shutdown) still ends it."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit the mask

    def wait():
        while signal.sigwaitinfo(STOP_SIGNALS).si_pid != parent:
            pass
        os._exit(128 + signal.SIGTERM)
    threading.Thread(target=wait, daemon=True).start()


class CheckpointSchedule:
    """Mid-epoch checkpoints every `steps` optimizer steps and/or every `minutes` (0: off)."""

    def __init__(self, steps, minutes):
        self.steps, self.seconds = steps, minutes * 60
        self.last = time.monotonic()

    def due(self, step):
        return bool((self.steps and step % self.steps == 0)
                    or (self.seconds and time.monotonic() - self.last >= self.seconds))

    def saved(self):
        self.last = time.monotonic()

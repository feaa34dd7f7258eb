"""The run folder: options.json, train.log, TensorBoard events, checkpoints, results.

Training writes only inside the run folder, and only files with the names below.
"""
import glob
import json
import logging
import os
import sys

from lib.errors import UserError

OPTIONS = 'options.json'
LOG = 'train.log'
LAST = 'checkpoint_last.pth'
BEST = 'model_best.pth'
RESULTS = 'results.json'
RUN_FILES = (OPTIONS, LOG, LAST, BEST, RESULTS)
EVENTS_GLOB = 'events.out.tfevents.*'


def prepare_run_folder(folder, resuming=False, overwrite=False):
    """Create the folder; refuse to mix two runs in one folder unless asked to."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--logger_name {folder} is a file, not a folder')
    holds_run = os.path.isfile(os.path.join(folder, OPTIONS))
    if holds_run and not (resuming or overwrite):
        raise UserError(f'{folder} already holds a run; continue it with --resume {os.path.join(folder, LAST)}, '
                        'pick another --logger_name, or pass --overwrite to replace it')
    if holds_run and overwrite and not resuming:
        # remove only what a run writes (never anything else in the folder)
        for path in [os.path.join(folder, f) for f in RUN_FILES] + glob.glob(os.path.join(folder, EVENTS_GLOB)):
            if os.path.isfile(path):
                os.unlink(path)
    os.makedirs(folder, exist_ok=True)
    return folder


def write_options(folder, args):
    with open(os.path.join(folder, OPTIONS), 'w') as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)


def setup_logger(folder=None, append=False, enabled=True):
    """Console and (when folder is given) train.log; quiet on non-main ranks."""
    logger = logging.getLogger('hrem')
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if folder is not None and enabled:
        handler = logging.FileHandler(os.path.join(folder, LOG), mode='a' if append else 'w')
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def write_results(folder, results, extra=None):
    doc = {'results': results, **(extra or {})}
    with open(os.path.join(folder, RESULTS), 'w') as f:
        json.dump(doc, f, indent=2)

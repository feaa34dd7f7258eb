"""The run folder: options.json, train.log, TensorBoard events, checkpoints, results.

Training writes only inside the run folder, and only files with the names below.
"""
import glob
import json
import logging
import os
import sys

from lib.errors import UserError
from lib.writing import atomic_write, check_writable_folder, describe, write_failure

OPTIONS = 'options.json'
LOG = 'train.log'
LAST = 'checkpoint_last.pth'
BEST = 'model_best.pth'
RESULTS = 'results.json'
RUN_FILES = (OPTIONS, LOG, LAST, BEST, RESULTS)
EVENTS_GLOB = 'events.out.tfevents.*'
# also the run's own: TensorBoard events, the test similarities, temporary files of
# lib.writing.atomic_write (removed when a write fails; only a killed process leaves one)
RUN_GLOBS = (EVENTS_GLOB, 'results_*.npy', '.*.pth.*.tmp', '.options.json.*.tmp', '.results*.tmp')


def run_files(folder):
    """The files of a run in `folder` (never anything a run does not write)."""
    found = [os.path.join(folder, f) for f in RUN_FILES]
    for pattern in RUN_GLOBS:
        found += glob.glob(os.path.join(glob.escape(folder), pattern))
    return [p for p in found if os.path.islink(p) or os.path.isfile(p)]


def check_run_folder(folder):
    """At start-up, before any data is read: the run folder can be created and written."""
    if not folder or not folder.strip():
        raise UserError('--logger_name is empty; give the folder the run should be written to')
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--logger_name {folder} is a file, not a folder')
    check_writable_folder(folder, 'the run folder (--logger_name)')


def prepare_run_folder(folder, resuming=False, overwrite=False):
    """Create the folder; refuse to mix two runs in one folder unless asked to."""
    if not folder or not folder.strip():
        raise UserError('--logger_name is empty; give the folder the run should be written to')
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f'--logger_name {folder} is a file, not a folder')
    existing = run_files(folder) if os.path.isdir(folder) else []
    links = [p for p in existing if os.path.islink(p)]
    if links:  # writing through a link would change a file outside the run folder
        raise UserError(f'{links[0]} is a symbolic link; a run writes only real files inside its folder. '
                        'Remove the link or pick another --logger_name')
    if existing and not (resuming or overwrite):
        last = os.path.join(folder, LAST)
        how = (f'continue it with --resume {last}' if os.path.isfile(last)
               else 'it has no checkpoint to resume from')
        raise UserError(f'{folder} already holds a run ({os.path.basename(existing[0])}); {how}, '
                        'pick another --logger_name, or pass --overwrite to replace it')
    if overwrite and not resuming:
        for path in existing:  # only what a run writes: other files in the folder stay
            os.unlink(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise write_failure(folder, err, 'the run folder', kept=False) from err
    return folder


def write_options(folder, args):
    with atomic_write(os.path.join(folder, OPTIONS), 'w') as f:
        json.dump(vars(args), f, indent=2, sort_keys=True)


class LogFile(logging.FileHandler):
    """train.log: a failed write (full disk) stops the run with one line, instead of logging's
    '--- Logging error ---' traceback on every later message."""

    def handleError(self, record):
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            raise UserError(f'could not write {self.baseFilename}: {describe(err)}; the messages before this one '
                            'are in it') from err
        super().handleError(record)


def setup_logger(folder=None, append=False, enabled=True):
    """Console and (when folder is given) train.log; quiet on non-main ranks."""
    logger = logging.getLogger('hrem')
    for handler in logger.handlers:  # an earlier run in this process (tests) may hold train.log open
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    fmt = logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if folder is not None and enabled:
        handler = LogFile(os.path.join(folder, LOG), mode='a' if append else 'w')
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def write_results(folder, results, extra=None):
    doc = {'results': results, **(extra or {})}
    with atomic_write(os.path.join(folder, RESULTS), 'w') as f:
        json.dump(doc, f, indent=2)

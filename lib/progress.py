"""Progress bars for the waits of more than a few seconds (tokenising, encoding, scanning, ranking).

tqdm's conventions: on stderr, and off (disable=None) when stderr is not a terminal, so logs of
non-interactive runs are not flooded. Callers pass enabled=False on ranks other than 0.
"""
import sys

from tqdm import tqdm

SHOW_AFTER_S = 2  # a wait shorter than this never shows a bar (no flicker for one query)


def progress(iterable=None, enabled=True, **kwargs):
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, delay=SHOW_AFTER_S,
                dynamic_ncols=True, leave=False, **kwargs)

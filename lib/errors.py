"""Errors a person can act on: one message, one non-zero exit, no traceback."""
import functools
import re
import sys


class UserError(Exception):
    """A problem with the user's files or options; the message names the file and the fix."""


EXIT_USER_ERROR = 2

# How a DataLoader reports a failure in a worker process: an exception raised there comes back
# re-raised with this prefix and the worker's traceback as its message; a worker that died
# (killed, out of memory) surfaces as a RuntimeError naming its pid.
_WORKER_RAISED = re.compile(r'Caught (\w+) in DataLoader worker process (\d+)')
_WORKER_DIED = 'DataLoader worker (pid'


def worker_failure_message(err):
    """One plain line for an exception that came from a DataLoader worker, else None."""
    text = str(err).strip()
    raised = _WORKER_RAISED.match(text)
    if raised:
        original = text.splitlines()[-1]  # "module.Class: message", the last line of the traceback
        if raised.group(1) == UserError.__name__:
            return original.split(': ', 1)[-1]
        return (f'a DataLoader worker failed while reading training data: {original}. '
                'Rerun with --workers 0 to see where it happened')
    if _WORKER_DIED in text:
        return (f'a DataLoader worker process died ({text.splitlines()[0]}): it was killed or ran out of '
                'memory (RAM or /dev/shm). Lower --workers (or use --workers 0) and continue with '
                '--resume <run folder>/checkpoint_last.pth')
    return None


def exit_on_user_error(main):
    """Decorator for entry points: print a UserError, or a DataLoader worker's failure, as one
    line and exit with status 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - anything that is not the user's problem is re-raised
            message = worker_failure_message(err)
            if message is None and isinstance(err, UserError):
                message = str(err)
            if message is None:
                raise
            print(f'error: {message}', file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return wrapper

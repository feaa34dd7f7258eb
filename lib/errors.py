"""Errors a person can act on: one message, one non-zero exit, no traceback."""
import functools
import os
import re
import sys


class UserError(Exception):
    """A problem with the user's files or options; the message names the file and the fix."""


EXIT_USER_ERROR = 2
# a rank that stops because another rank of a distributed run failed (that rank says why)
EXIT_OTHER_RANK = 3

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


# How a collective reports a peer that is gone: gloo's TCP transport ('Connection closed by peer',
# a reset or broken pipe), a timeout of the process group (gloo 'Timed out waiting ...ms', NCCL's
# watchdog), or the rendezvous store of a rank that exited.
_PEER_GONE = re.compile(r'Connection closed by peer|Connection reset by peer|Broken pipe|Connection refused|'
                        r'Timed out waiting|collective operation timeout|NCCL communicator was aborted')


def other_rank_failure_message(err):
    """One line for a rank of a distributed run whose collective failed because another rank
    stopped (crashed, was killed or raised its own error), else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    text = str(err).strip()
    is_dist_error = isinstance(err, getattr(dist, 'DistError', ()))
    if not (is_dist_error or (isinstance(err, RuntimeError) and _PEER_GONE.search(text))):
        return None
    detail = _PEER_GONE.search(text)
    detail = detail.group(0) if detail else type(err).__name__
    return (f'rank {dist.get_rank()} stopped: another rank failed or was stopped ({dist.get_backend()}: {detail}); '
            'that rank\'s own message (or the launcher\'s) says why')


def exit_on_user_error(main):
    """Decorator for entry points: print a UserError, or a DataLoader worker's failure, as one
    line and exit with status 2; a rank whose collective broke because another rank failed
    prints one line saying so and exits with status 3."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - anything that is not the user's problem is re-raised
            other = other_rank_failure_message(err)
            if other is not None:
                print(f'error: {other}', file=sys.stderr)
                # not sys.exit: tearing down a process group whose peer died can abort in C++
                # ("terminate called without an active exception", seen with gloo), which would turn
                # this one-line exit into SIGABRT. The checkpoint is on disk; events the writer had
                # not flushed are purged on resume anyway.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_OTHER_RANK)
            message = worker_failure_message(err)
            if message is None and isinstance(err, UserError):
                message = str(err)
            if message is None:
                raise
            print(f'error: {message}', file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
    return wrapper

"""Every file the project writes goes through here: atomic replacement, and one plain line when
the write fails.

A write fails with an OSError (full disk, quota, file size limit, read-only or missing folder, a
path component that is a file, permission denied). Writers that call back into Python (torch's zip
writer, numpy, matplotlib) do not always let it through: torch.save to a file object that hits a
full disk raises RuntimeError('[enforce fail at inline_container.cc:...] unexpected pos ...') whose
__context__ is the OSError. `os_error_in` finds the OSError in the chain, so that a RuntimeError
without one (a genuine bug) is never reported as a disk fault.
"""
import contextlib
import errno
import os
import tempfile

from lib.errors import UserError

# what the user can do about each cause
HINTS = {
    errno.ENOSPC: 'the disk is full; free space',
    errno.EDQUOT: 'the disk quota is used up; free space or raise the quota',
    errno.EFBIG: 'the file size limit (ulimit -f) is reached; raise it',
    errno.EROFS: 'the file system is read-only; write somewhere else',
    errno.EACCES: 'no write permission; write somewhere else or fix the permissions',
    errno.EPERM: 'no write permission; write somewhere else or fix the permissions',
    errno.ENOENT: 'the folder does not exist',
    errno.ENOTDIR: 'a part of the path is a file, not a folder',
    errno.EISDIR: 'the path is a folder',
}


def os_error_in(err):
    """The OSError that `err` is or was raised while handling (cause or context chain), else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno is not None:
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def interruption_in(err):
    """A KeyboardInterrupt or SystemExit in the chain: torch's zip writer turns one raised inside
    its write callback (Ctrl-C during torch.save) into RuntimeError('... unexpected pos ...')."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def describe(os_err):
    """'No space left on device (the disk is full; free space)'."""
    cause = os_err.strerror or os.strerror(os_err.errno)
    hint = HINTS.get(os_err.errno)
    return f'{cause} ({hint})' if hint else cause


def write_failure(path, err, what='', kept=None, advice=None):
    """The UserError for a failed write of `path`: the file, the cause, what is intact, the fix."""
    os_err = os_error_in(err)
    name = f'{what} {path}' if what else str(path)
    if kept is None:
        kept = os.path.isfile(path)
    parts = [f'could not write {name}: {describe(os_err)}',
             f'the previous {os.path.basename(path)} is intact' if kept else f'no {os.path.basename(path)} was written']
    if advice:
        parts.append(advice)
    return UserError('; '.join(parts))


@contextlib.contextmanager
def reported(path, what='', advice=None):
    """Turn a failed write inside the block (an OSError in the exception chain) into the
    UserError of write_failure; anything else passes unchanged."""
    try:
        yield
    except BaseException as err:
        interrupted = interruption_in(err)
        if interrupted is not None and interrupted is not err:
            raise interrupted.with_traceback(None) from None  # the interruption, not torch's wrapper
        if not isinstance(err, UserError) and os_error_in(err) is not None:
            raise write_failure(path, err, what, advice=advice) from err
        raise


def reserve(f, nbytes):
    """Allocate nbytes for file object f now: a memory-mapped file on a full disk then fails
    here with ENOSPC, instead of killing the process with SIGBUS at the first page it touches."""
    try:
        os.posix_fallocate(f.fileno() if hasattr(f, 'fileno') else f, 0, nbytes)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
            raise


def fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename itself is done
        pass
    finally:
        os.close(fd)


def _mode_of(path):
    """The permissions of the file being replaced, else those a plain open() would give."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path, mode='wb', what='', advice=None, **open_kwargs):
    """Yield a file object on a temporary file next to `path`; on success flush, fsync and rename
    it over `path`. On any failure the temporary file is removed and `path` is left as it was; a
    failed write (an OSError in the exception chain) becomes a UserError naming file and cause."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with reported(path, what, advice):
            fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
            os.fchmod(fd, _mode_of(path))  # mkstemp's 0600 would hide results from the user's group
            with os.fdopen(fd, mode, **open_kwargs) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    fsync_folder(folder)


def check_writable_folder(folder, what='folder'):
    """Refuse, before any work, a folder that cannot be created or written: a path through a
    file, a read-only or full file system, no permission. Nothing is left behind: a missing
    folder is probed in its nearest existing parent."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f'cannot create {what} {folder}: {existing} is a file, not a folder')
    try:
        probe = tempfile.mkdtemp(prefix='.write_check.', dir=existing)
        try:
            with open(os.path.join(probe, 'probe'), 'wb') as f:
                f.write(b'\0' * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(probe, 'probe'))
            with contextlib.suppress(OSError):
                os.rmdir(probe)
    except OSError as err:
        where = '' if existing == os.path.abspath(folder) else f' (in {existing})'
        raise UserError(f'cannot write {what} {folder}{where}: {describe(err)}') from err


def make_folders(folder, what='folder'):
    """os.makedirs(exist_ok=True) with one plain line when it fails."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise UserError(f'could not create {what} {folder}: {describe(err)}') from err


def save_figure(fig, path, **kwargs):
    """matplotlib's savefig, atomic, its format from the file name (PNG when it has none)."""
    make_folders(os.path.dirname(os.path.abspath(path)))
    ext = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
    with atomic_write(path, 'wb', what='the figure') as f:
        fig.savefig(f, format=ext, **kwargs)

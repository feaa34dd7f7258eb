"""Write faults produced for real, not mocked: a full file system (a small tmpfs, as root), the
file size limit (RLIMIT_FSIZE, no root needed), a read-only file system or folder, a path through
a file; in one process and under torchrun with two gloo processes; a rank killed with SIGKILL.

Every failed write must end in one line naming the file and the cause, exit status 2, the
previous file intact and no temporary file left.
"""
import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import eval as eval_script
import train
from lib import checkpoint as ckpt_lib
from lib.errors import UserError
from lib.writing import atomic_write, os_error_in
from test_errors import REPO, assert_user_error, bert, data, run_main, save_checkpoint, train_argv  # noqa: F401

TORCHRUN_TIMEOUT = 420  # a hang guard only: a healthy launch here takes well under a minute


# ----------------------------------------------------------------------------- real faults

@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes; unmounted at the end. Needs root."""
    if os.geteuid() != 0:
        pytest.skip('mounting a tmpfs needs root (CI runs as root)')
    mounts = []

    def mount(size, name='fs', options=''):
        target = tmp_path / name
        target.mkdir()
        proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}{options}', 'tmpfs', str(target)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
        mounts.append(target)
        return target
    try:
        yield mount
    finally:
        for handler in logging.getLogger('hrem').handlers:  # an in-process run may hold train.log open
            handler.close()
        for target in mounts:
            subprocess.run(['umount', '-l', str(target)], check=False)


def fill(folder, leave=0):
    """Fill the file system of folder until `leave` bytes stay free (one filler file)."""
    path = os.path.join(folder, 'filler')
    with open(path, 'wb', buffering=0) as f:
        chunk = b'\0' * 65536
        try:
            while True:
                f.write(chunk)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    size = os.path.getsize(path)
    os.truncate(path, max(0, size - leave))
    return path


def leftovers(folder):
    """Temporary files a write left behind."""
    return [f for f in os.listdir(folder) if f.endswith('.tmp') or f.endswith('.partial')]


def with_fsize_limit(limit):
    """preexec_fn: writes beyond `limit` bytes fail with EFBIG (SIGXFSZ ignored)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# ----------------------------------------------------------------------------- what torch raises

def test_torch_save_on_a_full_disk_raises_runtime_error_after_oserror(tmpfs):
    """What the helper relies on, checked against the real thing: torch's zip writer turns the
    OSError of a full disk into RuntimeError('... unexpected pos ...') with the OSError as context."""
    fs = tmpfs('64k')
    with pytest.raises(RuntimeError) as raised, open(fs / 'x.pth', 'wb') as f:
        torch.save({'w': torch.zeros(100000)}, f)
    assert 'unexpected pos' in str(raised.value)
    assert os_error_in(raised.value).errno == errno.ENOSPC


def test_a_runtime_error_without_an_oserror_is_not_a_write_fault(tmp_path):
    path = tmp_path / 'x.pth'
    with pytest.raises(RuntimeError, match='a bug'), atomic_write(str(path)) as f:
        f.write(b'half')
        raise RuntimeError('a bug')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('how', ['full_disk', 'file_size_limit'])
def test_save_atomic_on_a_real_fault_keeps_the_previous_checkpoint(tmp_path, tmpfs, how):
    """ENOSPC from a full tmpfs, EFBIG from RLIMIT_FSIZE (in a child: the limit is per process)."""
    folder = tmpfs('1m') if how == 'full_disk' else tmp_path
    path = os.path.join(folder, 'checkpoint_last.pth')
    ckpt_lib.save_atomic({'format': ckpt_lib.FORMAT, 'w': torch.arange(6.0)}, path)
    before = open(path, 'rb').read()
    code = ('import sys, torch; sys.path.insert(0, sys.argv[2]); from lib import checkpoint as c; '
            'from lib.errors import exit_on_user_error; '
            'exit_on_user_error(lambda: c.save_atomic({"w": torch.zeros(1 << 20)}, sys.argv[1]))()')
    proc = subprocess.run([sys.executable, '-c', code, path, REPO], capture_output=True, text=True,
                          preexec_fn=with_fsize_limit(200_000) if how == 'file_size_limit' else None)
    cause = ('No space left on device (the disk is full; free space)' if how == 'full_disk'
             else 'File too large (the file size limit (ulimit -f) is reached; raise it)')
    assert_user_error(proc.returncode, proc.stderr, f'error: could not write checkpoint {path}: {cause}; '
                      'the previous checkpoint_last.pth is intact')
    assert open(path, 'rb').read() == before
    assert leftovers(folder) == []


# ----------------------------------------------------------------------------- training, one process

def first_run(data, bert, folder, *extra):
    """Two steps of a tiny run (5 steps an epoch) into folder: checkpoint_last.pth at step 2."""
    train.main([*train_argv(data, bert, 'unused', '--max_steps', '2', *extra), '--logger_name', str(folder)])
    return os.path.join(folder, 'checkpoint_last.pth')


SCENARIOS = {
    # resume from step 2 into a full disk: the next checkpoint_last.pth does not fit
    'mid_epoch': ('checkpoint_last.pth', ['--max_steps', '4', '--checkpoint_every', '1']),
    'epoch_end': ('checkpoint_last.pth', []),
    # a hard link (a backup) keeps the previous checkpoint's blocks: room for one checkpoint only
    'model_best': ('model_best.pth', []),
}


def prepare_full_disk(run, scenario):
    """Leave less room than the next write needs (the checkpoint's size is that of the last)."""
    size = os.path.getsize(os.path.join(run, 'checkpoint_last.pth'))
    if scenario == 'model_best':
        os.link(os.path.join(run, 'checkpoint_last.pth'), os.path.join(os.path.dirname(run), 'backup.pth'))
        fill(os.path.dirname(run), leave=size + size // 2)
    else:
        fill(os.path.dirname(run), leave=size // 2)


def check_full_disk_outcome(code, err, run, scenario, before):
    name, _ = SCENARIOS[scenario]
    target = os.path.join(run, name)
    last = os.path.join(run, 'checkpoint_last.pth')
    kept = f'the previous {name} is intact' if scenario != 'model_best' else 'no model_best.pth was written'
    line = assert_user_error(code, err, f'error: could not write checkpoint {target}: No space left on device '
                             f'(the disk is full; free space); {kept}; continue with --resume {last} once the '
                             'cause is fixed')
    assert '\n' not in line
    saved = ckpt_lib.read_raw(last)
    if scenario == 'model_best':  # checkpoint_last.pth of the epoch's end fitted
        assert (saved['epoch'], saved['iteration']) == (1, 5)
        assert not os.path.exists(target)
    else:
        assert open(last, 'rb').read() == before, 'the previous checkpoint is untouched'
        assert saved['iteration'] == 2
    assert leftovers(run) == []


@pytest.mark.parametrize('scenario', list(SCENARIOS))
def test_full_disk_while_training_one_process(data, bert, tmpfs, capsys, scenario):
    run = os.path.join(tmpfs('48m'), 'run')
    last = first_run(data, bert, run)
    before = open(last, 'rb').read()
    prepare_full_disk(run, scenario)
    code, err = run_main(train.main, ['--resume', last, '--device', 'cpu', *SCENARIOS[scenario][1]], capsys)
    check_full_disk_outcome(code, err, run, scenario, before)


# ----------------------------------------------------------------------------- bad --logger_name

def bad_logger_name(kind, tmp_path, tmpfs):
    if kind == 'through_a_file':
        (tmp_path / 'afile').write_text('x')
        return str(tmp_path / 'afile' / 'run'), f'{tmp_path / "afile"} is a file, not a folder'
    if kind == 'read_only_file_system':
        fs = tmpfs('1m', options=',ro')
        return str(fs / 'run'), 'Read-only file system (the file system is read-only; write somewhere else)'
    if kind == 'full_disk':
        fs = tmpfs('256k')
        fill(fs)
        return str(fs / 'run'), 'No space left on device (the disk is full; free space)'
    if os.geteuid() == 0:
        pytest.skip('root writes into a read-only folder; the read-only file system covers this as root')
    folder = tmp_path / 'locked'
    folder.mkdir()
    folder.chmod(0o500)
    return str(folder / 'run'), 'Permission denied (no write permission'


@pytest.mark.parametrize('kind', ['through_a_file', 'read_only_file_system', 'full_disk', 'read_only_folder'])
def test_bad_logger_name_is_refused_before_any_data_is_read(data, bert, tmp_path, tmpfs, capsys, monkeypatch,
                                                            kind):
    folder, cause = bad_logger_name(kind, tmp_path, tmpfs)
    read = []
    monkeypatch.setattr(train, 'load_tokenizer', lambda *a: read.append(a) or pytest.fail('data was read'))
    code, err = run_main(train.main, [*train_argv(data, bert), '--logger_name', folder], capsys)
    assert_user_error(code, err, 'the run folder (--logger_name)', folder.rsplit('/run', 1)[0], cause)
    assert read == []


# ----------------------------------------------------------------------------- the other writers

def test_eval_outputs_on_a_full_disk(data, bert, tmpfs, capsys):
    fs = tmpfs('1m')
    ckpt = save_checkpoint(data / 'model.pth', data, bert)
    argv = ['--checkpoint', ckpt, '--device', 'cpu', '--bert_path', bert]
    (fs / 'r.json').write_text('{"old": 1}')
    fill(fs)
    code, err = run_main(eval_script.main, [*argv, '--json', str(fs / 'r.json')], capsys)
    assert_user_error(code, err, f'could not write {fs / "r.json"}: No space left on device',
                      'the previous r.json is intact')
    assert json.loads((fs / 'r.json').read_text()) == {'old': 1}
    code, err = run_main(eval_script.main, [*argv, '--save_sims', str(fs / 's.npy')], capsys)
    assert_user_error(code, err, f'could not write similarities {fs / "s.npy"}: No space left on device',
                      'no s.npy was written')
    assert sorted(os.listdir(fs)) == ['filler', 'r.json']


def test_convert_features_past_the_file_size_limit(data, tmp_path):
    out = tmp_path / 'half'
    code = subprocess.run([sys.executable, 'tools/convert_features.py', '--data_path', str(data), '--dataset', 'tiny',
                           '--out', str(out), '--dtype', 'float16'], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=with_fsize_limit(300))
    target = out / 'tiny_precomp' / 'dev_ims.npy'
    assert_user_error(code.returncode, code.stderr, f'could not write converted features {target}: File too large',
                      'no dev_ims.npy was written')
    assert os.listdir(out / 'tiny_precomp') == []


# ----------------------------------------------------------------------------- torchrun, two gloo processes

def tiny_argv(data, bert, folder, *extra):
    return [*train_argv(data, bert, 'unused', *extra), '--logger_name', str(folder)]


def torchrun(argv, timeout=TORCHRUN_TIMEOUT, wait=True):
    """train.py under torchrun with two gloo processes, in a session of its own (a hung launch is
    killed whole: agent and ranks)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py', *argv]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        kill_session(proc)
    return proc.returncode, err


def kill_session(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def project_tracebacks(err):
    """Traceback lines through this project's code (torchrun's own summary goes through torch only)."""
    return [line for line in err.splitlines()
            if re.match(r'\s*File "', line) and REPO in line or 'File "train.py"' in line]


def errors_of(err):
    return [line for line in err.splitlines() if line.startswith('error: ')]


@pytest.fixture(scope='module')
def two_rank_run(tmp_path_factory, bert):
    """A run of two gloo processes stopped by --max_steps 2 (a mid-epoch checkpoint of 2 ranks)."""
    from test_errors import make_data
    root = tmp_path_factory.mktemp('ddp_faults')
    make_data(root)
    code, err = torchrun(tiny_argv(root, bert, root / 'run', '--max_steps', '2'))
    assert code == 0, err
    return root, root / 'run'


@pytest.mark.parametrize('scenario', list(SCENARIOS))
def test_full_disk_while_training_under_torchrun(two_rank_run, tmpfs, scenario):
    root, first = two_rank_run
    run = os.path.join(tmpfs('48m'), 'run')
    shutil.copytree(first, run)
    last = os.path.join(run, 'checkpoint_last.pth')
    before = open(last, 'rb').read()
    prepare_full_disk(run, scenario)
    code, err = torchrun(['--resume', last, '--device', 'cpu', *SCENARIOS[scenario][1]])
    assert code != 0
    assert project_tracebacks(err) == [], err
    lines = errors_of(err)
    assert len(lines) == 2, err
    failing = [line for line in lines if 'could not write checkpoint' in line]
    assert len(failing) == 1, err
    check_full_disk_outcome(2, failing[0], run, scenario, before)  # rank 0's line, checked as one process
    assert re.fullmatch(r'error: rank 1 stopped: another rank failed or was stopped \(gloo: Connection closed by '
                        r'peer\); .*', [line for line in lines if line not in failing][0]), err


def rank_pid(launcher_pid, rank, timeout=120):
    """The pid of the torchrun rank `rank` (a child of the launcher whose RANK is rank)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError):
            children = open(f'/proc/{launcher_pid}/task/{launcher_pid}/children').read().split()
            for pid in children:
                with contextlib.suppress(OSError):
                    environ = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
                    if f'RANK={rank}'.encode() in environ:
                        return int(pid)
        time.sleep(0.2)
    raise AssertionError(f'no rank {rank} under launcher {launcher_pid}')


def wait_for_training(folder, timeout=TORCHRUN_TIMEOUT):
    """Until train.log shows that the steps have started."""
    log = os.path.join(folder, 'train.log')
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(log) and 'steps per epoch' in open(log).read():
            time.sleep(2)  # inside the first steps
            return
        time.sleep(0.2)
    raise AssertionError(f'{log} never showed training')


def test_a_rank_killed_with_sigkill_ends_the_torchrun_job_within_a_minute(two_rank_run, bert):
    root, _ = two_rank_run
    folder = root / 'killed'
    proc = torchrun(tiny_argv(root, bert, folder, '--num_epochs', '1000'), wait=False)
    try:
        wait_for_training(folder)
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=TORCHRUN_TIMEOUT)
        ended = time.time() - killed
    finally:
        kill_session(proc)
    assert proc.returncode != 0
    assert ended < 60, f'the job took {ended:.0f} s to end after the kill'
    assert project_tracebacks(err) == [], err
    assert 'Signal 9 (SIGKILL) received by PID' in err  # torchrun's summary names the killed rank


def test_a_rank_killed_without_torchrun_agent_ends_the_other_within_a_minute(two_rank_run, bert):
    """As srun starts every rank itself: nothing stops the survivor but its broken collective."""
    root, _ = two_rank_run
    folder = root / 'srun'
    port = str(__import__('test_distributed').free_port())
    procs = [subprocess.Popen([sys.executable, 'train.py', *tiny_argv(root, bert, folder, '--num_epochs', '1000')],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'RANK': str(r),
                                   'LOCAL_RANK': str(r), 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1',
                                   'MASTER_PORT': port}, start_new_session=True)
             for r in range(2)]
    try:
        wait_for_training(folder)
        procs[1].kill()
        killed = time.time()
        _, err = procs[0].communicate(timeout=TORCHRUN_TIMEOUT)
        ended = time.time() - killed
    finally:
        for p in procs:
            kill_session(p)
    assert ended < 60, f'rank 0 took {ended:.0f} s to end after the kill'
    assert procs[0].returncode == 3, err
    assert 'Traceback' not in err, err
    assert re.fullmatch(r'error: rank 0 stopped: another rank failed or was stopped \(gloo: .*', err.strip()
                        .splitlines()[-1]), err


# ----------------------------------------------------------------------------- small writers on a full disk

def test_train_log_on_a_full_disk_is_one_line(tmpfs):
    from lib.run_folder import setup_logger
    fs = tmpfs('256k')
    logger = setup_logger(str(fs))
    fill(fs)
    with pytest.raises(UserError, match=re.escape(f'could not write {fs / "train.log"}: No space left on device '
                                                  '(the disk is full; free space); the messages before this one')):
        logger.info('x' * 65536)  # more than one page: the write itself fails, not a later flush


def test_search_cache_on_a_full_disk_is_a_warning_and_leaves_nothing(tmpfs, capsys):
    import search
    fs = tmpfs('256k')
    fill(fs)
    path = str(fs / 'model_best.search_tiny_test.npz')
    search.write_cache(path, 'key', np.zeros((100, 64), np.float32), np.zeros((500, 64), np.float32))
    err = capsys.readouterr().err.strip()
    assert err == (f'warning: could not write the search cache {path}: No space left on device (the disk is full; '
                   'free space); no model_best.search_tiny_test.npz was written; the next search encodes the '
                   'gallery again')
    assert os.listdir(fs) == ['filler']


def test_figure_on_a_full_disk_keeps_the_previous_one(tmpfs):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from lib.writing import save_figure
    fs = tmpfs('1m')
    fig = plt.figure(figsize=(8, 8))
    plt.plot(np.random.default_rng(0).random(10000))
    save_figure(fig, str(fs / 'curves.png'), dpi=100)
    before = (fs / 'curves.png').read_bytes()
    fill(fs)
    with pytest.raises(UserError, match='could not write the figure .*curves.png: No space left on device .*'
                                        'the previous curves.png is intact'):
        save_figure(fig, str(fs / 'curves.png'), dpi=100)
    plt.close(fig)
    assert (fs / 'curves.png').read_bytes() == before
    assert sorted(os.listdir(fs)) == ['curves.png', 'filler']


def test_make_shapes_on_a_full_disk(tmpfs):
    """cv2.imwrite would only return False: the tool now fails with the line."""
    fs = tmpfs('200k')
    proc = subprocess.run([sys.executable, 'tools/make_shapes.py', '--out', str(fs / 'out'), '--per_pair', '2'],
                          cwd=REPO, capture_output=True, text=True)
    assert_user_error(proc.returncode, proc.stderr, 'could not write', 'No space left on device')
    assert not [f for _, _, files in os.walk(fs) for f in files if f.endswith('.tmp')]



def test_extract_features_on_a_disk_too_small_for_the_array(tmpfs, tmp_path):
    """The feature array is memory-mapped: without reserving its room first, the first page that
    does not fit kills the process with SIGBUS instead of an error."""
    from test_own_images import EXTRACT, make_folder, write_lines
    write_lines(tmp_path / 'caps.txt', make_folder(tmp_path / 'images'))
    fs = tmpfs('128k')
    out = fs / 'own_precomp'
    proc = subprocess.run([sys.executable, 'tools/extract_features.py', '--images', str(tmp_path / 'images'),
                           '--captions', str(tmp_path / 'caps.txt'), '--out', str(out), '--split', 'test', *EXTRACT],
                          cwd=REPO, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert_user_error(proc.returncode, proc.stderr, f'could not write features {out / "test_ims.npy"}: No space left '
                      'on device (the disk is full; free space); no test_ims.npy was written')
    assert os.listdir(out) == []

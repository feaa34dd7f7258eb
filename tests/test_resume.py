"""--resume: two epochs in one go equal one epoch, a run killed in the second epoch, and a resume;
and equal a run killed (SIGKILL) or stopped (SIGTERM, --max_steps) inside an epoch and resumed
from its mid-epoch checkpoint: one process with 0 or 2 DataLoader workers, and two gloo processes.

Same weights, optimizer and schedule state, best score, results, and the same TensorBoard steps
(the killed run's events after its checkpoint are purged, nothing is duplicated or missing).
"""
import json
import multiprocessing
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import arguments
import lib.resume
import lib.training
import train
from lib.data import PrecompSplit
from lib.loader import TrainDataset, make_loader
from lib.distributed import DistEnv
from lib.models import HREM, config_from_args
from lib.loader import make_loader
from test_distributed import free_port
from test_errors import assert_user_error, bert_folder, make_data, run_main, train_argv
from test_faults import in_worker_only, nan_on_calls

STEPS_PER_EPOCH = 5  # 20 captions, batch 4
# the relation module starts in the second epoch; the lr decays after the first
OPTIONS = ['--warmup', '7', '--lr_schedules', '1', '--seed', '3', '--log_step', '1']


class FlushingWriter(SummaryWriter):
    """Every event reaches the disk at once, as if the killed run had flushed just before dying."""

    def add_scalar(self, *args, **kwargs):
        super().add_scalar(*args, **kwargs)
        self.flush()


def kill_on_call(monkeypatch, n):
    original = HREM.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt  # what SIGINT does; SIGKILL leaves the same files behind
        return original(self, *args, **kwargs)
    monkeypatch.setattr(HREM, 'forward', forward)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy machine they only make steps wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """Run a: two epochs in one go, the reference of every resumed run; (data root, BERT folder)."""
    root = tmp_path_factory.mktemp('resume')
    make_data(root)
    bert = bert_folder(root / 'bert')
    train.main(train_argv(root, bert, 'a', *OPTIONS, '--num_epochs', '2'))
    return root, bert


@pytest.fixture(scope='module')
def runs(straight):
    """Run b: one epoch; resumed and killed at its 3rd step; resumed again."""
    root, bert = straight
    train.main(train_argv(root, bert, 'b', *OPTIONS, '--num_epochs', '1'))
    last = str(root / 'b' / 'checkpoint_last.pth')
    older = torch.load(last, weights_only=True)
    del older['counters'], older['position']  # as versions before mid-epoch checkpoints wrote it
    torch.save(older, last)
    killed_at = torch.load(last, weights_only=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lib.training, 'SummaryWriter', FlushingWriter)
        kill_on_call(mp, 3)
        with pytest.raises(KeyboardInterrupt):
            train.main(['--resume', last, '--num_epochs', '2', '--device', 'cpu', '--workers', '0'])
    after_kill = torch.load(last, weights_only=True)
    train.main(['--resume', last, '--num_epochs', '2', '--device', 'cpu', '--workers', '0'])
    return root / 'a', root / 'b', killed_at, after_kill


def assert_same(x, y, where):
    """Exact equality of nested checkpoints: tensors bit for bit, everything else with ==."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert set(x) == set(y), (where, set(x) ^ set(y))
        for k in x:
            assert_same(x[k], y[k], f'{where}.{k}')
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (a, b) in enumerate(zip(x, y)):
            assert_same(a, b, f'{where}[{i}]')
    else:
        assert x == y, (where, x, y)


def events(folder):
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def test_the_kill_left_the_last_checkpoint_of_epoch_one(runs):
    _, _, killed_at, after_kill = runs
    assert killed_at['epoch'] == 1 and killed_at['iteration'] == STEPS_PER_EPOCH
    assert_same(killed_at, after_kill, 'checkpoint_last.pth')


@pytest.mark.parametrize('name', ['checkpoint_last.pth', 'model_best.pth'])
def test_same_weights_optimizer_schedule_and_counters(runs, name):
    a, b, _, _ = runs
    ckpt_a = torch.load(a / name, weights_only=True)
    ckpt_b = torch.load(b / name, weights_only=True)
    for key in ('model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'iteration', 'best_rsum'):
        assert_same(ckpt_a[key], ckpt_b[key], key)
    if name == 'checkpoint_last.pth':
        assert ckpt_a['epoch'] == 2 and ckpt_a['iteration'] == 2 * STEPS_PER_EPOCH
        assert ckpt_a['scheduler']['last_epoch'] == 2
        assert ckpt_a['optimizer']['state'], 'optimizer state is saved'


def test_same_tensorboard_steps_none_duplicated_or_missing(runs):
    a, b, _, _ = runs
    ev_a, ev_b = events(a), events(b)
    assert set(ev_a) == set(ev_b)
    for tag in ev_a:
        steps_a, steps_b = [s for s, _ in ev_a[tag]], [s for s, _ in ev_b[tag]]
        assert steps_a == steps_b, tag
        assert len(set(steps_b)) == len(steps_b), f'{tag}: duplicated steps {steps_b}'
    assert [s for s, _ in ev_b['train/loss']] == list(range(2 * STEPS_PER_EPOCH))
    assert [s for s, _ in ev_b['val/rsum']] == [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]
    for tag in ('train/loss', 'train/loss_gnn', 'val/rsum', 'test/rsum'):
        assert ev_a[tag] == ev_b[tag], tag  # the very same numbers, not only the same steps
    assert [s for s, _ in ev_b['train/loss_gnn']] == list(range(7, 2 * STEPS_PER_EPOCH))


def same_results(a, b, where=''):
    res_a, res_b = (json.loads((f / 'results.json').read_text()) for f in (a, b))
    for res in (res_a, res_b):  # the only field that may differ: how long the process took
        assert res.pop('wall_time_s') > 0
    assert res_a == res_b, where


def test_same_results(runs):
    a, b, _, _ = runs
    same_results(a, b)
    assert os.path.isfile(b / 'train.log') and 'resumed from' in (b / 'train.log').read_text()


# ----------------------------------------------------------------------------- inside an epoch

MID = ['--num_epochs', '2', '--checkpoint_every', '2']  # mid-epoch checkpoints after steps 2, 4, 6, 8
WALL_CLOCK_TAGS = {'train/step_time', 'train/samples_per_s'}
# forward calls (1-based; call c runs step c - 1) whose last checkpoint is a mid-epoch one: 3, 4
# resume after step 2, 5 after 4, 8 after 6, 9 and 10 after 8 (calls 6, 7 after epoch 0's end)
KILL_CALLS = (3, 4, 5, 8, 9, 10)


def assert_same_run(a, b, where):
    """Run folder b ends exactly as a: checkpoints bit for bit, every TensorBoard step once with the
    same value (wall-clock timings: the same steps), the same test results."""
    for name in ('checkpoint_last.pth', 'model_best.pth'):
        ckpt_a = torch.load(a / name, weights_only=True)
        ckpt_b = torch.load(b / name, weights_only=True)
        for key in ('model', 'optimizer', 'scheduler', 'scaler', 'epoch', 'iteration', 'best_rsum'):
            assert_same(ckpt_a[key], ckpt_b[key], f'{where}: {name} {key}')
        assert ckpt_b.get('position') is None, f'{where}: {name} is an epoch-end checkpoint'
    ev_a, ev_b = events(a), events(b)
    assert set(ev_a) == set(ev_b), where
    for tag in ev_a:
        if tag in WALL_CLOCK_TAGS:
            assert [s for s, _ in ev_a[tag]] == [s for s, _ in ev_b[tag]], (where, tag)
        else:
            assert ev_a[tag] == ev_b[tag], (where, tag)
    assert [s for s, _ in ev_b['train/loss']] == list(range(2 * STEPS_PER_EPOCH)), where
    same_results(a, b, where)


ORIGINAL_FORWARD = HREM.forward


def forward_hook(call, action):
    """Replace HREM.forward by one that runs action() when it is called for the call-th time."""
    original, calls = HREM.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            action()
        return original(self, *args, **kwargs)
    return forward


def in_child(target, *args):
    """Run target(*args) in a forked process (what it imports is already loaded); its exit status."""
    child = multiprocessing.get_context('fork').Process(target=target, args=args)
    child.start()
    child.join()
    return child.exitcode


def _killed_run(argv, call, action):
    os.setpgid(0, 0)  # a process group of its own and its DataLoader workers, as a batch job's
    HREM.forward = forward_hook(call, action)
    train.main(argv)


def sigkill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)


def sigterm_group():
    # SLURM and Ctrl-C signal every process, DataLoader workers included; from another process
    subprocess.run(['kill', '-TERM', '--', f'-{os.getpgid(0)}'], check=True, start_new_session=True)


def next_second():
    """TensorBoard orders a folder's event files by the second they were created in, then by the
    writer's pid; a resumed run starts seconds after the kill, one started at once must wait."""
    time.sleep(1.01 - time.time() % 1)


def resume_argv(folder, *extra):
    return ['--resume', str(folder / 'checkpoint_last.pth'), '--device', 'cpu', *extra]


@pytest.mark.parametrize('workers', ['0', '2'])
def test_sigkill_inside_an_epoch_then_resume_equals_the_straight_run(straight, workers):
    root, bert = straight
    call = random.SystemRandom().choice(KILL_CALLS)  # train.main seeds the global random module
    run = root / f'kill{workers}'
    code = in_child(_killed_run, train_argv(root, bert, run.name, *OPTIONS, *MID, '--workers', workers),
                    call, sigkill_self)
    assert code == -signal.SIGKILL, (call, code)
    killed_at = torch.load(run / 'checkpoint_last.pth', weights_only=True)
    taken = (call - 1) // 2 * 2  # the last checkpoint, every 2 steps, before the killed step call - 1
    assert killed_at['iteration'] == taken, (call, killed_at['iteration'])
    assert (killed_at['epoch'], killed_at['position']['batches']) == divmod(taken, STEPS_PER_EPOCH)
    next_second()
    train.main(resume_argv(run, '--workers', workers))
    assert_same_run(root / 'a', run, f'killed at forward call {call}, workers {workers}')


def test_sigterm_to_the_process_group_stops_after_the_step_then_resume_equals_the_straight_run(straight):
    root, bert = straight
    run = root / 'term'
    # received during step 7 (epoch 1, its 3rd batch; relations run from step 7), with 2 workers
    code = in_child(_killed_run, train_argv(root, bert, run.name, *OPTIONS, '--num_epochs', '2', '--workers', '2'),
                    8, sigterm_group)
    assert code == 128 + signal.SIGTERM
    stopped = torch.load(run / 'checkpoint_last.pth', weights_only=True)
    assert (stopped['epoch'], stopped['iteration'], stopped['position']['batches']) == (1, 8, 3)
    log = (run / 'train.log').read_text()
    assert 'stopped by SIGTERM at step 8 (epoch 1, batch 3 of 5)' in log
    assert f'--resume {run / "checkpoint_last.pth"}' in log
    assert torch.load(run / 'model_best.pth', weights_only=True)['iteration'] == STEPS_PER_EPOCH
    next_second()
    train.main(resume_argv(run))
    assert_same_run(root / 'a', run, 'SIGTERM at step 7')


def test_max_steps_inside_an_epoch_then_resume_continues_that_epoch(straight, monkeypatch):
    root, bert = straight
    run = root / 'steps'
    train.main(train_argv(root, bert, run.name, *OPTIONS, '--num_epochs', '2', '--max_steps', '7'))
    stopped = torch.load(run / 'checkpoint_last.pth', weights_only=True)
    assert (stopped['epoch'], stopped['iteration'], stopped['position']['batches']) == (1, 7, 2)
    assert stopped['scheduler']['last_epoch'] == 1, 'the stopped epoch has not ended'
    assert torch.load(run / 'model_best.pth', weights_only=True)['iteration'] == STEPS_PER_EPOCH
    assert json.loads((run / 'results.json').read_text())['checkpoint'] == 'model_best.pth'

    read = []
    original = TrainDataset.__getitems__
    monkeypatch.setattr(TrainDataset, '__getitems__', lambda self, i: read.extend(i) or original(self, i))
    train.main(resume_argv(run))  # no --max_steps: the limit was the stopped invocation's
    # the resumed run reads only the rest of epoch 1's order: batches 2, 3, 4 of 4 captions
    order = torch.utils.data.DistributedSampler(range(20), 1, 0, shuffle=True, seed=3, drop_last=True)
    order.set_epoch(1)
    assert read == list(order)[2 * 4:]
    assert_same_run(root / 'a', run, '--max_steps 7, then --resume')


def test_nonfinite_counts_continue_across_a_mid_epoch_resume(straight, monkeypatch):
    root, bert = straight
    nan_on_calls(monkeypatch, {1, 4})  # batches 1 and 4 (0-based) of the epoch are skipped
    train.main(train_argv(root, bert, 'nan_a', *OPTIONS))
    monkeypatch.setattr(HREM, 'forward', ORIGINAL_FORWARD)
    nan_on_calls(monkeypatch, {1, 4})  # counting from 0 again
    monkeypatch.setattr(HREM, 'forward', forward_hook(3, sigterm_self))  # during batch 2: stop after step 1
    with pytest.raises(SystemExit) as stop:
        train.main(train_argv(root, bert, 'nan_b', *OPTIONS))
    assert stop.value.code == 128 + signal.SIGTERM
    stopped = torch.load(root / 'nan_b' / 'checkpoint_last.pth', weights_only=True)
    assert (stopped['iteration'], stopped['position']['batches'], stopped['counters']['nonfinite_total']) == (2, 3, 1)
    monkeypatch.setattr(HREM, 'forward', ORIGINAL_FORWARD)
    nan_on_calls(monkeypatch, {1})  # the resumed run starts at batch 3
    train.main(resume_argv(root / 'nan_b', '--workers', '0'))
    a, b = events(root / 'nan_a'), events(root / 'nan_b')
    assert a['train/nonfinite_steps'] == b['train/nonfinite_steps'] == [(1, 1.0), (3, 2.0)]
    assert [s for s, _ in b['train/loss']] == [0, 1, 2]
    for name in ('checkpoint_last.pth', 'model_best.pth'):
        ckpt_a, ckpt_b = (torch.load(f / name, weights_only=True) for f in (root / 'nan_a', root / 'nan_b'))
        for key in ('model', 'optimizer', 'iteration', 'counters'):
            assert_same(ckpt_a[key], ckpt_b[key], f'{name} {key}')


def test_a_mid_epoch_checkpoint_resumes_only_with_as_many_processes(straight, capsys):
    root, bert = straight
    folder = root / 'one_of_two'
    train.main(train_argv(root, bert, folder.name, *OPTIONS, '--max_steps', '2'))
    ckpt = torch.load(folder / 'checkpoint_last.pth', weights_only=True)
    ckpt['position'] = {**ckpt['position'], 'world_size': 2}
    torch.save(ckpt, folder / 'checkpoint_last.pth')
    code, err = run_main(train.main, resume_argv(folder), capsys)
    assert_user_error(code, err, f'{folder / "checkpoint_last.pth"} was written inside an epoch by 2 process(es); '
                                 'resume it with as many (this run has 1)')


def test_a_second_signal_stops_at_once_and_handlers_are_restored(straight, monkeypatch):
    root, bert = straight
    # Python's own SIGINT handler, which the second signal falls through to; a process started in
    # the background by a non-interactive shell inherits SIGINT ignored and has none
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(lib.resume, 'REPEAT_WINDOW_S', -1.0)  # any repeat counts as a second request

    def twice():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(HREM, 'forward', forward_hook(3, twice))
    run = root / 'twice'
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(train_argv(root, bert, run.name, *OPTIONS, '--checkpoint_every', '1'))
        assert torch.load(run / 'checkpoint_last.pth', weights_only=True)['iteration'] == 2, 'no step after it'
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_dataloader_workers_leave_stop_signals_to_the_main_process_but_end_on_its_own(straight, monkeypatch,
                                                                                     tokenizer):
    root, bert = straight
    # a worker started by any method (fork inherits the main process's handlers, spawn does not)
    monkeypatch.setattr(TrainDataset, '__getitems__', in_worker_only(lambda: os.kill(os.getpid(), signal.SIGTERM)))
    args = arguments.parse_train_args(train_argv(root, bert, 'unused', '--workers', '2'))
    loader, _, _ = make_loader(PrecompSplit(str(root), 'tiny', 'train', tokenizer), args,
                                     DistEnv(0, 1, 0, torch.device('cpu')))
    assert sorted(i for batch in loader for i in batch['caption_ids'].tolist()) == list(range(20))
    # a worker left running (an iterator alive at exit) still ends on its parent's SIGTERM, which is
    # how multiprocessing ends daemonic children at exit and DataLoader ends stuck workers
    ready = multiprocessing.get_context('fork').Event()
    worker = multiprocessing.get_context('fork').Process(target=_idle_worker, args=(ready,), daemon=True)
    worker.start()
    assert ready.wait(timeout=60), 'the worker survived its own SIGTERM'
    worker.terminate()
    worker.join(timeout=60)
    assert worker.exitcode == 128 + signal.SIGTERM


def _idle_worker(ready):
    lib.resume.ignore_stop_signals(0)
    os.kill(os.getpid(), signal.SIGTERM)  # not from the parent: ignored
    ready.set()
    time.sleep(60)


def test_a_repeated_signal_within_the_window_is_the_same_request():
    before = signal.getsignal(signal.SIGTERM)
    with lib.resume.StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # e.g. torchrun forwarding the SIGTERM its rank also got
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------- two gloo processes


def _gloo_rank(rank, plan):
    """One rank of each planned run: (port, argv, hook (rank or None for all, call, action), status file)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), MASTER_ADDR='127.0.0.1')
    for port, argv, hook, status_file in plan:
        os.environ['MASTER_PORT'] = str(port)
        if hook is not None and hook[0] in (rank, None):
            HREM.forward = forward_hook(hook[1], hook[2])
        try:
            train.main(argv)
        except SystemExit as stop:
            with open(f'{status_file}{rank}', 'w') as f:
                f.write(str(stop.code))
        HREM.forward = ORIGINAL_FORWARD


def two_ranks(plan):
    ctx = multiprocessing.get_context('fork')
    ranks = [ctx.Process(target=_gloo_rank, args=(r, plan)) for r in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)  # a rank left waiting for the other one fails the test, not the suite
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in ranks]


def test_two_gloo_processes_killed_or_stopped_inside_an_epoch_then_resumed(straight):
    root, bert = straight
    call = random.SystemRandom().choice(KILL_CALLS)  # train.main seeds the global random module
    argv = {run: train_argv(root, bert, run, *OPTIONS, *MID) for run in ('da', 'db', 'dc')}
    # da straight; dc: only rank 1 gets SIGTERM, during step 7; db: both ranks SIGKILLed at `call`
    codes = two_ranks([(free_port(), argv['da'], None, None),
                       (free_port(), argv['dc'], (1, 8, sigterm_self), root / 'dc_exit'),
                       (free_port(), argv['db'], (None, call, sigkill_self), None)])
    assert codes == [-signal.SIGKILL] * 2, codes
    assert [(root / f'dc_exit{r}').read_text() for r in range(2)] == [str(128 + signal.SIGTERM)] * 2
    stopped = torch.load(root / 'dc' / 'checkpoint_last.pth', weights_only=True)
    assert (stopped['iteration'], stopped['position']['batches'], stopped['position']['world_size']) == (8, 3, 2)
    assert len(stopped['position']['rng']) == 2
    assert not torch.equal(stopped['position']['rng'][0]['torch'], stopped['position']['rng'][1]['torch'])
    next_second()
    codes = two_ranks([(free_port(), resume_argv(root / 'db'), None, None),
                       (free_port(), resume_argv(root / 'dc'), None, None)])
    assert codes == [0, 0]
    assert_same_run(root / 'da', root / 'db', f'two processes killed at forward call {call}')
    assert_same_run(root / 'da', root / 'dc', 'two processes, SIGTERM on rank 1 at step 7')

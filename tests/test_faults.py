"""Faults: a kill while saving, non-finite losses, DataLoader worker failures. (A full disk and the
other write faults are produced for real in test_write_faults.py.)"""
import errno
import os
import signal

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import arguments
import train
import lib.writing
from lib import checkpoint as ckpt_lib
from lib.loader import TrainDataset
from lib.models import HREM, Outputs, config_from_args
from lib.text_model import load_text_backbone
from lib.training import seed_all
from test_errors import DIM, assert_user_error, bert, data, run_main, train_argv  # noqa: F401 (fixtures)


def scalars(folder, tag):
    acc = EventAccumulator(str(folder), size_guidance={'scalars': 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()['scalars'] else []


# ----------------------------------------------------------------------------- atomic checkpoints

class InterruptedFile:
    """A file whose third write is interrupted by `exc` (Ctrl-C, an exit), inside torch's own zip
    writer, which wraps it in RuntimeError('... unexpected pos ...') as it really does."""

    def __init__(self, f, exc):
        self.f, self.exc, self.writes = f, exc, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            raise self.exc
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def interrupted_fdopen(exc):
    real = os.fdopen
    return lambda fd, *a, **k: InterruptedFile(real(fd, *a, **k), exc)


@pytest.mark.parametrize('exc', [KeyboardInterrupt(), SystemExit(1)])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = str(tmp_path / 'checkpoint_last.pth')
    previous = {'format': ckpt_lib.FORMAT, 'epoch': 1, 'weights': torch.arange(6.0)}
    ckpt_lib.save_atomic(previous, path)
    before = open(path, 'rb').read()

    monkeypatch.setattr(lib.writing.os, 'fdopen', interrupted_fdopen(exc))
    with pytest.raises(type(exc)):
        ckpt_lib.save_atomic({'format': ckpt_lib.FORMAT, 'epoch': 2, 'weights': torch.zeros(6)}, path)
    monkeypatch.undo()

    assert open(path, 'rb').read() == before
    assert torch.equal(ckpt_lib.read_raw(path)['weights'], torch.arange(6.0))
    assert os.listdir(tmp_path) == ['checkpoint_last.pth'], 'no temporary file is left behind'


def test_save_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = str(tmp_path / 'model_best.pth')
    for epoch in (1, 2):
        ckpt_lib.save_atomic({'epoch': epoch}, path)
        assert ckpt_lib.read_raw(path) == {'epoch': epoch}
    assert os.listdir(tmp_path) == ['model_best.pth']


# ----------------------------------------------------------------------------- non-finite losses

def nan_on_calls(monkeypatch, bad_calls):
    """HREM.forward returns a NaN loss on the given (0-based) calls; returns the call counter."""
    original = HREM.forward
    calls = []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(len(calls))
        if calls[-1] in bad_calls:
            nan = torch.tensor(float('nan'))
            return Outputs(out.loss * nan, {**out.parts, 'total': out.parts['total'] * nan})
        return out
    monkeypatch.setattr(HREM, 'forward', forward)
    return calls


def test_nonfinite_steps_are_skipped_counted_and_logged(data, bert, capsys, monkeypatch):
    calls = nan_on_calls(monkeypatch, set(range(5)))
    argv = train_argv(data, bert, 'run', '--max_nonfinite', '6')
    train.main(argv)
    assert len(calls) == 5, 'one epoch of 5 batches, all skipped'
    run = data / 'run'
    assert [v for _, v in scalars(run, 'train/nonfinite_steps')] == [1, 2, 3, 4, 5]
    assert scalars(run, 'train/loss') == [], 'a skipped batch is no optimizer step'
    saved = torch.load(run / 'checkpoint_last.pth', weights_only=True)
    assert saved['iteration'] == 0
    assert '5 in a row, 5 in total' in (run / 'train.log').read_text()
    # the weights are the initial ones, built as train.py builds them
    args = arguments.parse_train_args(argv)
    bert_model = load_text_backbone(bert)
    seed_all(args.seed)
    initial = HREM(config_from_args(args, DIM), bert_model)
    for part in ('img_enc', 'txt_enc', 'relation'):
        for name, param in getattr(initial, part).named_parameters():
            assert torch.equal(saved['model'][part][name], param.detach()), (part, name)


def test_too_many_nonfinite_steps_in_a_row_abort(data, bert, capsys, monkeypatch):
    nan_on_calls(monkeypatch, {0, 2, 3, 4})  # 1 finite step resets the count: 3 in a row at step 1
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--max_nonfinite', '3'), capsys)
    assert_user_error(code, err, 'the loss was not finite for 3 steps in a row (at step 1); training stopped',
                      'lower --learning_rate', 'the last checkpoint is intact')
    assert [v for _, v in scalars(data / 'run', 'train/nonfinite_steps')] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- DataLoader workers

def in_worker_only(action):
    """A TrainDataset.__getitems__ (the DataLoader reads whole batches) that runs `action` inside
    a DataLoader worker process."""
    original = TrainDataset.__getitems__

    def getitems(self, indices):
        if torch.utils.data.get_worker_info() is not None:
            action()
        return original(self, indices)
    return getitems


def test_killed_worker_is_reported_plainly(data, bert, capsys, monkeypatch):
    monkeypatch.setattr(TrainDataset, '__getitems__', in_worker_only(lambda: os.kill(os.getpid(), signal.SIGKILL)))
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--workers', '1'), capsys)
    assert_user_error(code, err, 'a DataLoader worker process died (DataLoader worker (pid',
                      'killed or ran out of memory', 'Lower --workers', '--resume')


def test_raising_worker_is_reported_plainly(data, bert, capsys, monkeypatch):
    def fail():
        raise OSError(errno.EIO, 'Input/output error')
    monkeypatch.setattr(TrainDataset, '__getitems__', in_worker_only(fail))
    code, err = run_main(train.main, train_argv(data, bert, 'run', '--workers', '1'), capsys)
    last = assert_user_error(code, err, 'a DataLoader worker failed while reading training data: '
                                        'OSError: [Errno 5] Input/output error', 'Rerun with --workers 0')
    assert '\n' not in last

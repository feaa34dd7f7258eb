"""--resume: two epochs in one go equal one epoch, a run killed in the second epoch, and a resume.

Same weights, optimizer and schedule state, best score, results, and the same TensorBoard steps
(the killed run's events after its checkpoint are purged, nothing is duplicated or missing).
"""
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import train
from lib.model import HREM
from test_errors import bert_folder, make_data, train_argv

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


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Run a: two epochs. Run b: one epoch; resumed and killed at its 3rd step; resumed again."""
    root = tmp_path_factory.mktemp('resume')
    make_data(root)
    bert = bert_folder(root / 'bert')
    train.main(train_argv(root, bert, 'a', *OPTIONS, '--num_epochs', '2'))
    train.main(train_argv(root, bert, 'b', *OPTIONS, '--num_epochs', '1'))
    last = str(root / 'b' / 'checkpoint_last.pth')
    killed_at = torch.load(last, weights_only=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, 'SummaryWriter', FlushingWriter)
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


def test_same_results(runs):
    a, b, _, _ = runs
    res_a, res_b = (json.loads((f / 'results.json').read_text()) for f in (a, b))
    for res in (res_a, res_b):  # the only field that may differ: how long the process took
        assert res.pop('wall_time_s') > 0
    assert res_a == res_b
    assert os.path.isfile(b / 'train.log') and 'resumed from' in (b / 'train.log').read_text()

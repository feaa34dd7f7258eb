"""Optimisation of spec section 6: parameter groups, AdamW, the step schedule, gradient clipping."""
import copy

import pytest
import torch

from lib.distributed import DistEnv
from lib.engine import train_one_epoch
from lib.training import TrainState
from lib.models import HREM, config_from_args
from lib.optim import build_optimizer
from lib.precision import grad_scaler
from conftest import tiny_args, tiny_bert
from test_relations import fake_batch


def make(*extra):
    args = tiny_args('--learning_rate', '2e-3', '--graph_lr_factor', '3', '--lr_schedules', '15', '25',
                     '--num_epochs', '30', *extra)
    return HREM(config_from_args(args, 24), tiny_bert()), args


def test_parameter_groups_and_adamw():
    model, args = make()
    optimizer, _ = build_optimizer(model, args)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    want_lr = {'text': 2e-3, 'bert': 2e-4, 'image': 2e-3, 'relation': 6e-3}
    seen = []
    for group in optimizer.param_groups:
        assert group['lr'] == pytest.approx(want_lr[group['name']])
        assert group['weight_decay'] == pytest.approx(1e-4)
        for p in group['params']:
            name = names[id(p)]
            seen.append(name)
            prefix = {'text': ('txt_enc.linear', 'txt_enc.aggr'), 'bert': ('txt_enc.bert.',),
                      'image': ('img_enc.',), 'relation': ('relation.',)}[group['name']]
            assert name.startswith(prefix), (group['name'], name)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable)  # every trainable parameter exactly once
    assert not any('pooler' in n for n in seen)  # the unused BERT pooler is frozen


def test_step_schedule_per_epoch():
    model, args = make()
    optimizer, scheduler = build_optimizer(model, args)
    base = {g['name']: g['lr'] for g in optimizer.param_groups}
    for epoch in range(30):
        factor = 0.1 ** sum(epoch >= m for m in (15, 25))
        for g in optimizer.param_groups:
            assert g['lr'] == pytest.approx(base[g['name']] * factor), (epoch, g['name'])
        optimizer.step()
        scheduler.step()  # once per epoch, as train.py


@pytest.mark.parametrize('clip', [1e-3, 1e3])
def test_train_one_epoch_clips_the_gradient_norm(clip):
    model, args = make('--base_loss', 'vse', '--gnn_loss', 'vse', '--dropout', '0', '--warmup', '0',
                       '--topk', '3', '--grad_clip', str(clip), '--batch_size', '6', '--log_step', '1')
    reference = copy.deepcopy(model)
    batch = fake_batch()
    optimizer, _ = build_optimizer(model, args)
    params = [p for g in optimizer.param_groups for p in g['params']]
    stepped = []
    optimizer.register_step_pre_hook(lambda opt, a, k: stepped.append([p.grad.clone() for p in params]))
    state = TrainState()
    env = DistEnv(0, 1, 0, torch.device('cpu'))
    assert train_one_epoch(model, [batch], optimizer, grad_scaler(env.device, 'fp32'), state, args, env)
    assert state.step == 1 and len(stepped) == 1

    # the same step by hand: full gradient (sum-over-negatives vse in epoch 0), clipped to norm `clip`
    ref_params = dict(reference.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    reference(batch, 0, max_violation=False).loss.backward()
    grads = [ref_params[names[id(p)]].grad for p in params]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    scale = min(1.0, clip / (norm.item() + 1e-6))
    for got, g in zip(stepped[0], grads):
        torch.testing.assert_close(got, g * scale, rtol=1e-4, atol=1e-8)
    got_norm = torch.cat([g.flatten() for g in stepped[0]]).norm().item()
    assert got_norm == pytest.approx(min(clip, norm.item()), rel=1e-4)
    assert all(p.grad is None for p in params)  # zeroed after the step

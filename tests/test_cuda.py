"""The GPU paths: mixed precision with the grad scaler, a run on CUDA evaluated on CPU, one nccl
process with SyncBatchNorm under torchrun, --compile and --tf32.

Run by `pytest -m cuda` (bash bench/gpu_check.sh); skipped where torch sees no CUDA GPU.
"""
import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import eval as eval_script
import train
from conftest import tiny_args, tiny_bert
from lib import checkpoint as ckpt_lib
from lib.compile import check_compile, compile_encoders
from lib.distributed import DistEnv
from lib.engine import train_one_epoch
from lib.training import TrainState
from lib.evaluation import load_sims
from lib.models import HREM, config_from_args
from lib.optim import build_optimizer
from lib.precision import DTYPES, grad_scaler, set_tf32
from test_distributed import key_bias
from test_errors import REPO, bert, make_data, train_argv  # noqa: F401 (fixture)
from test_faults import nan_on_calls
from test_precision import random_batch

pytestmark = pytest.mark.cuda
CUDA = torch.device('cuda')


@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_mixed_precision_steps_with_the_grad_scaler_and_the_nonfinite_skip(precision, monkeypatch):
    if precision == 'bf16' and not torch.cuda.is_bf16_supported():
        pytest.skip(f'{torch.cuda.get_device_name()} has no bf16')
    args = tiny_args('--warmup', '0', '--precision', precision)
    torch.manual_seed(0)
    model = HREM(config_from_args(args, 12), tiny_bert()).to(CUDA)
    optimizer, _ = build_optimizer(model, args)
    assert optimizer.defaults['fused']  # one fused update kernel on CUDA
    scaler = grad_scaler(CUDA, precision)
    assert scaler.is_enabled() == (precision == 'fp16')
    encoder_dtypes = []
    model.img_enc.fc.register_forward_hook(lambda m, i, o: encoder_dtypes.append(o.dtype))
    calls = nan_on_calls(monkeypatch, {1})  # the second batch's loss is NaN
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}

    state = TrainState()
    batches = [random_batch(seed=s) for s in range(3)]  # on CPU: train_one_epoch moves them
    assert train_one_epoch(model, batches, optimizer, scaler, state, args, DistEnv(0, 1, 0, CUDA))
    assert len(calls) == 3 and state.step == 2 and state.nonfinite_total == 1
    assert set(encoder_dtypes) == {DTYPES[precision]}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
    for name in ('img_enc.fc.fc.weight', 'txt_enc.linear.weight', 'relation.mlp_t2i.0.weight'):
        assert not torch.equal(initial[name], dict(model.named_parameters())[name]), name
    if precision == 'fp16':
        assert 0 < scaler.get_scale() < float('inf')


def test_a_cuda_run_loads_on_cpu_and_evaluates_alike(tmp_path, bert):
    make_data(tmp_path)
    train.main(train_argv(tmp_path, bert, 'run', '--device', 'cuda', '--workers', '1', '--max_steps', '3'))
    run = tmp_path / 'run'
    saved = ckpt_lib.read_checkpoint(str(run / 'checkpoint_last.pth'))
    assert saved['iteration'] == 3
    assert all(group['fused'] for group in saved['optimizer']['param_groups'])
    cuda_sims = load_sims(str(run / 'results_tiny.npy'))  # model_best.pth ranked on CUDA by train.py
    eval_script.main(['--checkpoint', str(run / 'model_best.pth'), '--device', 'cpu',
                      '--save_sims', str(tmp_path / 'cpu.npy')])
    cpu_sims = load_sims(str(tmp_path / 'cpu.npy'))
    assert cpu_sims.shape == cuda_sims.shape == (4, 20)
    np.testing.assert_allclose(cpu_sims, cuda_sims, atol=1e-4, rtol=0)


NCCL_STEP = '''
import json, os, sys
import torch, torch.distributed as dist, torch.nn as nn
sys.path[:0] = [{repo!r}, {tests!r}]
from conftest import tiny_args, tiny_bert
from lib.distributed import DistEnv, wrap_ddp
from lib.engine import train_one_epoch
from lib.training import TrainState
from lib.models import HREM, config_from_args
from lib.optim import build_optimizer
from lib.precision import grad_scaler
from test_precision import random_batch

device = torch.device('cuda', int(os.environ['LOCAL_RANK']))
torch.cuda.set_device(device)
dist.init_process_group('nccl', device_id=device)
env = DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ['LOCAL_RANK']), device)
args = tiny_args('--warmup', '1', '--dropout', '0', '--base_loss', 'vse', '--gnn_loss', 'vse',
                 '--max_steps', '3', '--grad_clip', '0')
params, sync_bn = {{}}, 0
for distributed in (False, True):
    torch.manual_seed(0)
    model = HREM(config_from_args(args, 12), tiny_bert()).to(device)
    optimizer, _ = build_optimizer(model, args)
    train_model, gather = wrap_ddp(model, env, args.seed) if distributed else (model, None)
    if distributed:
        sync_bn = sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
        plain_bn = sum(type(m) is nn.BatchNorm1d for m in model.modules())
    state = TrainState()
    batches = [random_batch(seed=s) for s in range(4)]
    train_one_epoch(train_model, batches, optimizer, grad_scaler(device, 'fp32'), state, args, env, gather=gather)
    assert state.step == 3
    params[distributed] = {{k: v.cpu() for k, v in model.state_dict().items()}}
torch.save({{'plain': params[False], 'ddp': params[True], 'backend': dist.get_backend(),
            'sync_bn': sync_bn, 'plain_bn': plain_bn}}, {out!r})
dist.destroy_process_group()
'''


def test_torchrun_one_nccl_process_with_syncbatchnorm_trains_as_one_plain_process(tmp_path):
    """Three steps (the relation module from step 1) under DDP with nccl and SyncBatchNorm equal
    three steps of the plain model: one rank's gather, all-reduce and synchronised statistics
    are the identity."""
    script, out = tmp_path / 'nccl_step.py', tmp_path / 'params.pt'
    script.write_text(textwrap.dedent(NCCL_STEP.format(repo=REPO, tests=os.path.join(REPO, 'tests'), out=str(out))))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', str(script)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out)
    assert result['backend'] == 'nccl' and result['sync_bn'] > 0 and result['plain_bn'] == 0
    for name, ref in result['plain'].items():
        keep = ~key_bias(name, ref)
        torch.testing.assert_close(result['ddp'][name][keep], ref[keep], atol=1e-5, rtol=0, msg=name)


def test_compile_on_cuda_gives_the_eager_loss_and_gradients():
    check_compile(CUDA)
    args = tiny_args('--warmup', '0', '--dropout', '0', '--base_loss', 'vse', '--gnn_loss', 'vse')
    torch.manual_seed(0)
    eager = HREM(config_from_args(args, 12), tiny_bert()).to(CUDA)
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
    losses, grads = [], []
    for model in (eager, compiled):
        for n in (6, 4):  # two batch shapes: dynamic shapes, no failure on a new size
            model.zero_grad()
            batch = {k: v.to(CUDA) for k, v in random_batch(n=n, regions=3 + n, tokens=n + 1).items()}
            out = model(batch, step=0)
            out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert losses[1] == pytest.approx(losses[0], abs=1e-5, rel=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-4, rtol=1e-3, msg=name)


def test_tf32_switch_sets_the_cuda_matmul_mode():
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        set_tf32(CUDA, False)
        assert torch.backends.cuda.matmul.fp32_precision == before
        set_tf32(CUDA, True)
        assert torch.backends.cuda.matmul.fp32_precision == 'tf32'
    finally:
        torch.backends.cuda.matmul.fp32_precision = before

"""--precision: autocast behind one switch, fp32 default, losses and relations in fp32."""
import pytest
import torch

import graph_lib
import lib.losses
import train
from conftest import tiny_args, tiny_bert
from lib.errors import UserError
from lib.models import HREM, config_from_args
from lib.optim import build_optimizer
from lib.precision import autocast, grad_scaler

CPU = torch.device('cpu')


def random_batch(n=6, regions=5, img_dim=12, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([tokens, 3, 5, tokens, 2, 4][:n])
    ids = torch.randint(1000, 2000, (n, tokens), generator=g) * (torch.arange(tokens) < lengths[:, None])
    return {'regions': torch.rand(n, regions, img_dim, generator=g), 'region_lengths': torch.full((n,), regions),
            'tokens': ids, 'token_lengths': lengths, 'img_ids': torch.tensor([0, 0, 1, 2, 3, 4][:n])}


def test_fp32_is_the_default_and_autocast_is_off():
    args = tiny_args()
    assert args.precision == 'fp32'
    with autocast(CPU, args.precision):
        assert not torch.is_autocast_enabled('cpu')
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert not grad_scaler(CPU, 'fp32').is_enabled()


def test_bf16_step_runs_encoders_in_bf16_and_losses_relations_in_fp32(monkeypatch):
    args = tiny_args('--warmup', '0', '--precision', 'bf16', '--base_loss', 'trip', '--gnn_loss', 'vse')
    torch.manual_seed(0)
    model = HREM(config_from_args(args, 12), tiny_bert())
    optimizer, _ = build_optimizer(model, args)
    scaler = grad_scaler(CPU, 'bf16')
    assert not scaler.is_enabled()  # bf16 has fp32's range: no loss scaling

    seen = {}

    def record(name, fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            seen.setdefault(name, []).append(
                (a[0].dtype, [o.dtype for o in (out if isinstance(out, tuple) else (out,))]))
            return out
        return wrapped

    monkeypatch.setattr(lib.losses, 'vse_loss', record('vse', lib.losses.vse_loss))
    monkeypatch.setattr(lib.losses, 'distance_weighted_triplet',
                        record('trip', lib.losses.distance_weighted_triplet))
    monkeypatch.setattr(graph_lib, 'region_word_scores', record('relation', graph_lib.region_word_scores))
    hidden = []
    model.img_enc.fc.register_forward_hook(lambda m, i, o: hidden.append(o.dtype))

    before = model.relation.mlp_t2i[0].weight.detach().clone()
    with autocast(CPU, 'bf16'):
        out = model(random_batch(), step=0)
    scaler.scale(out.loss).backward()
    scaler.step(optimizer)

    assert hidden == [torch.bfloat16]  # the encoders did run under bf16 autocast
    assert set(seen) == {'vse', 'trip', 'relation'}
    for name, calls in seen.items():
        for input_dtype, output_dtypes in calls:
            assert input_dtype == torch.float32, name
            assert all(d == torch.float32 for d in output_dtypes), name
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(before, model.relation.mlp_t2i[0].weight)  # the step updated the relation MLP


def test_fp16_on_cpu_is_a_user_error(capsys):
    with pytest.raises(UserError, match='fp16 needs a CUDA GPU'):
        autocast(CPU, 'fp16')
    with pytest.raises(UserError, match='fp16 needs a CUDA GPU'):
        grad_scaler(CPU, 'fp16')
    # the driver refuses before reading any data: exit code 2, a one-line message
    with pytest.raises(SystemExit) as exit_info:
        train.main(['--device', 'cpu', '--precision', 'fp16', '--data_path', '/nonexistent'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'error: --precision fp16 needs a CUDA GPU' in err and 'Traceback' not in err

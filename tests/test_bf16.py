"""--precision bf16 on CPU: the training step is finite and close to fp32 from the same weights and
batch, every parameter gets a gradient, the relation module and the losses run in fp32, and a CPU
without bf16 instructions gets one warning line."""
import copy

import pytest
import torch

import lib.losses
import train
from conftest import tiny_args, tiny_bert
from lib import precision
from lib.models import HREM, config_from_args
from lib.precision import autocast, bf16_units, bf16_warning, cpu_bf16_flags
from test_precision import random_batch

CPU = torch.device('cpu')


def models():
    args = tiny_args('--warmup', '0', '--precision', 'bf16')
    torch.manual_seed(0)
    fp32 = HREM(config_from_args(args, 12), tiny_bert())
    return fp32, copy.deepcopy(fp32)


def loss_and_grads(model, prec, batch):
    torch.manual_seed(0)  # the same dropout masks and trip-loss negatives for both precisions
    model.train()
    with autocast(CPU, prec):
        out = model(batch, step=0)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_loss_is_finite_and_close_to_fp32_on_a_fixed_batch():
    fp32, bf16 = models()
    batch = random_batch()
    out32, _ = loss_and_grads(fp32, 'fp32', batch)
    out16, _ = loss_and_grads(bf16, 'bf16', batch)
    assert torch.isfinite(out16.loss) and out16.loss.dtype == torch.float32
    for part in out32.parts:  # base, gnn, reg and total: bf16 rounds to about 3 significant digits
        assert out16.parts[part].item() == pytest.approx(out32.parts[part].item(), rel=0.02, abs=1e-3), part
    assert out16.loss.item() != out32.loss.item()  # autocast did change something


def test_bf16_gives_every_parameter_a_finite_fp32_gradient_close_in_direction():
    fp32, bf16 = models()
    batch = random_batch()
    _, g32 = loss_and_grads(fp32, 'fp32', batch)
    _, g16 = loss_and_grads(bf16, 'bf16', batch)
    assert set(g16) == set(g32) and any(n.startswith('relation.') for n in g16)
    missing = [n for n, g in g16.items() if g is None]
    assert not missing
    for name, g in g16.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].flatten() for n in g32])
    assert torch.nn.functional.cosine_similarity(flat32, flat16, dim=0) > 0.99


def test_under_bf16_the_relation_module_and_losses_compute_in_fp32(monkeypatch):
    _, model = models()
    seen = []
    for name, module in [('relation transformer', model.relation.transformer), ('relevance mlp', model.relation.mlp_t2i),
                         ('relevance mlp', model.relation.mlp_i2t)]:
        module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, i[0].dtype, o.dtype)))
    encoders = []
    model.img_enc.aggr.register_forward_hook(lambda m, i, o: encoders.append(o.dtype))
    model.txt_enc.linear.register_forward_hook(lambda m, i, o: encoders.append(o.dtype))
    losses = []
    real = lib.losses.distance_weighted_triplet

    def triplet(*a, **k):
        losses.append(a[0].dtype)
        out = real(*a, **k)
        losses.append(out.dtype)
        return out
    monkeypatch.setattr(lib.losses, 'distance_weighted_triplet', triplet)
    loss_and_grads(model, 'bf16', random_batch())
    assert encoders == [torch.bfloat16, torch.bfloat16]  # the encoders did run in bf16
    assert {s[0] for s in seen} == {'relation transformer', 'relevance mlp'}
    assert all(i == o == torch.float32 for _, i, o in seen), seen
    assert losses and set(losses) == {torch.float32}


def test_the_image_encoder_converts_its_regions_once_with_the_same_numbers():
    from lib.encoders import FCMLP
    torch.manual_seed(0)
    m = FCMLP(64, 32)
    v = torch.rand(3, 5, 64)
    converted = []
    for layer in (m.fc, m.mlp.layers[0]):
        layer.register_forward_pre_hook(lambda mod, i: converted.append(i[0].dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = m(v)
        separately = m.fc(v) + m.mlp(v)  # each linear converting fp32 regions itself
    assert converted[:2] == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(ours, separately)


# ----------------------------------------------------------------------------- the warning

def test_bf16_units_by_their_parts():
    assert bf16_units({}) is None
    assert bf16_units({'amx_bf16': False, 'avx512_bf16': False, 'arm_bf16': False}) is None
    assert bf16_units({'avx512_bf16': True}) == 'AVX512-BF16'
    assert bf16_units({'amx_bf16': True, 'avx512_bf16': True}) == 'AMX-BF16'
    assert bf16_units({'arm_bf16': True}) == 'ARM BF16'


def test_the_probe_reads_torch():
    flags = cpu_bf16_flags()
    assert set(flags) == {'amx_bf16', 'avx512_bf16', 'arm_bf16'} and all(isinstance(v, bool) for v in flags.values())
    assert flags['avx512_bf16'] == bool(torch.cpu._is_avx512_bf16_supported())
    assert flags['amx_bf16'] == bool(torch.cpu._is_amx_tile_supported())


def test_the_warning_only_for_bf16_on_a_cpu_without_bf16_instructions():
    line = bf16_warning(CPU, 'bf16', flags={})
    assert line and '\n' not in line and 'slower than fp32' in line and 'AVX512-BF16' in line
    assert bf16_warning(CPU, 'bf16', flags={'avx512_bf16': True}) is None
    assert bf16_warning(CPU, 'fp32', flags={}) is None
    assert bf16_warning(torch.device('cuda'), 'fp16', flags={}) is None


@pytest.mark.parametrize('units', [False, True])
def test_train_logs_one_warning_line_without_bf16_instructions(tmp_path, monkeypatch, units):
    from conftest import write_precomp
    from test_errors import WORDS, bert_folder
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ('train', 'dev', 'test'):
        write_precomp(tmp_path, 'tiny', split, 4, [' '.join(rng.choice(WORDS, 4)) for _ in range(20)], seed=1)
    bert = bert_folder(tmp_path / 'bert')
    monkeypatch.setattr(precision, 'cpu_bf16_flags', lambda: {'avx512_bf16': units})
    run = tmp_path / 'run'
    train.main(['--data_path', str(tmp_path), '--dataset', 'tiny', '--bert_path', bert, '--embed_size', '32',
                '--nhead', '4', '--batch_size', '4', '--workers', '0', '--device', 'cpu', '--num_epochs', '1',
                '--max_steps', '1', '--eval_batch_size', '8', '--precision', 'bf16', '--logger_name', str(run)])
    lines = [line for line in (run / 'train.log').read_text().splitlines() if 'bf16 matrix instructions' in line]
    assert len(lines) == (0 if units else 1)

"""Distributed training on CPU with two gloo processes: process-group setup, the gather with
gradient, equal skip decisions, and a training run equal to one process with the global batch."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from conftest import tiny_args, tiny_bert
from lib.distributed import GlobalBatch, all_finite, init_distributed, wrap_ddp

WORLD = 2


pytestmark = pytest.mark.usefixtures('one_thread')  # tiny tensors: threads only make steps wait


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def spawn(fn, *args):
    """Run fn(rank, port, *args) in WORLD processes, as torchrun would start them."""
    mp.spawn(_launch, args=(free_port(), fn, args), nprocs=WORLD, join=True)


def _launch(rank, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = init_distributed('cpu')
    try:
        fn(env, *args)
    finally:
        dist.destroy_process_group()


def test_single_process_fallback(monkeypatch):
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed('cpu')
    assert (env.rank, env.world_size, env.local_rank, env.device.type) == (0, 1, 0, 'cpu')
    assert env.is_main and not env.distributed and not dist.is_initialized()
    assert all_finite(torch.tensor(1.0), env) and not all_finite(torch.tensor(float('nan')), env)


# ----------------------------------------------------------------------------- collectives

def _collectives(env, out):
    r = env.rank
    result = {'rank': env.rank, 'world': env.world_size, 'backend': dist.get_backend(),
              'device': str(env.device)}
    gather = GlobalBatch(env)

    # ranks pad to the largest region count and token length before the encoders
    regions = torch.ones(2, 3 + 3 * r, 4)
    tokens = torch.full((2, 5 - r), 7)
    padded = gather.pad_batch({'regions': regions, 'tokens': tokens, 'img_ids': torch.zeros(2)})
    result['padded'] = (padded['regions'], padded['tokens'])

    # gather with gradient: every rank computes the same global loss
    img = torch.arange(6.).reshape(2, 3).add(10 * r).requires_grad_()
    cap = torch.arange(6.).reshape(2, 3).mul(r + 1).requires_grad_()
    reg = torch.randn(2, 4, 3, requires_grad=True)
    words = torch.randn(2, 5, 3)
    ids = torch.tensor([10 * r, 10 * r + 1])
    g_img, g_cap, g_reg, g_words, g_ids, g_len = gather(img, cap, reg, words, ids, ids + 1)
    weights = torch.arange(1., 13.).reshape(4, 3)
    loss = (weights * g_img).sum() + (g_cap ** 2).sum() + g_reg.sum()
    loss.backward()
    result.update(g_img=g_img.detach(), g_ids=g_ids, g_len=g_len, shapes=(g_reg.shape, g_words.shape),
                  img_grad=img.grad, cap_grad=cap.grad, reg_grad=reg.grad, cap=cap.detach())

    # the skip decision: one non-finite rank makes every rank skip
    result['finite_one_bad'] = all_finite(torch.tensor(float('inf') if r == 0 else 1.0), env)
    result['finite_all_good'] = all_finite(torch.tensor(1.0 + r), env)
    torch.save(result, os.path.join(out, f'rank{r}.pt'))


def test_process_group_gather_with_gradient_and_skip_decision(two_ranks):
    res = [torch.load(two_ranks['out'] / f'rank{r}.pt') for r in range(WORLD)]
    for r, got in enumerate(res):
        assert (got['rank'], got['world'], got['backend'], got['device']) == (r, WORLD, 'gloo', 'cpu')
        regions, tokens = got['padded']
        assert regions.shape == (2, 6, 4) and tokens.shape == (2, 5)
        n_reg, n_tok = 3 + 3 * r, 5 - r
        assert (regions[:, :n_reg] == 1).all() and (regions[:, n_reg:] == 0).all()
        assert (tokens[:, :n_tok] == 7).all() and (tokens[:, n_tok:] == 0).all()  # 0 is [PAD]

        expected_img = torch.cat([torch.arange(6.).reshape(2, 3).add(10 * q) for q in range(WORLD)])
        torch.testing.assert_close(got['g_img'], expected_img)
        assert got['g_ids'].tolist() == [0, 1, 10, 11] and got['g_len'].tolist() == [1, 2, 11, 12]
        assert got['shapes'] == (torch.Size([4, 4, 3]), torch.Size([4, 5, 3]))
        # all_gather's backward sums the W ranks' identical gradients: W x dL/d(local)
        weights = torch.arange(1., 13.).reshape(4, 3)
        torch.testing.assert_close(got['img_grad'], WORLD * weights[2 * r:2 * r + 2])
        torch.testing.assert_close(got['cap_grad'], WORLD * 2 * got['cap'])
        torch.testing.assert_close(got['reg_grad'], torch.full((2, 4, 3), float(WORLD)))
        assert got['finite_one_bad'] is False and got['finite_all_good'] is True


# ----------------------------------------------------------------------------- equivalence

N_IMAGES, N_REGIONS, IMG_DIM = 16, 6, 12
WORDS = 'a dog cat man woman red blue green runs sits on the beach street park with ball'.split()


def write_precomp(root):
    rng = np.random.default_rng(0)
    folder = os.path.join(root, 'tiny_precomp')
    os.makedirs(folder)
    np.save(os.path.join(folder, 'train_ims.npy'), rng.random((N_IMAGES, N_REGIONS, IMG_DIM), dtype=np.float32))
    with open(os.path.join(folder, 'train_caps.txt'), 'w') as f:
        for _ in range(5 * N_IMAGES):  # lengths 2..13 words: some shorter than --topk 10
            f.write(' '.join(rng.choice(WORDS, rng.integers(2, 14))) + '\n')
    return root


def equivalence_args(data_path, *extra):
    # augmentation stays on: its randomness depends on (seed, epoch, caption) only, so both
    # runs see the same items, and ranks get different region counts and caption lengths
    return tiny_args('--data_path', data_path, '--dataset', 'tiny', '--batch_size', '8', '--dropout', '0',
                     '--base_loss', 'vse', '--gnn_loss', 'vse', '--warmup', '2', '--max_steps', '5',
                     '--grad_clip', '0', *extra)


def build_model(args):
    from lib.models import HREM, config_from_args
    torch.manual_seed(0)
    model = HREM(config_from_args(args, IMG_DIM), tiny_bert())
    for m in model.modules():  # CPU has no SyncBatchNorm: BatchNorm stays frozen (eval mode)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train = lambda mode=True, m=m: nn.Module.train(m, False)
    return model.train()  # BatchNorm frozen from the start


def train_run(args, env, loader, gather_from_ddp):
    """Train like train.py for --max_steps steps; return the final parameters."""
    from lib.engine import train_one_epoch
    from lib.training import TrainState
    from lib.optim import build_optimizer
    from lib.precision import grad_scaler
    model = build_model(args)
    optimizer, _ = build_optimizer(model, args)
    train_model, gather = wrap_ddp(model, env, args.seed) if gather_from_ddp else (model, None)
    state = TrainState()
    finished = train_one_epoch(train_model, loader, optimizer, grad_scaler(env.device, 'fp32'), state, args, env,
                               gather=gather)
    assert not finished and state.step == args.max_steps
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _two_ranks(env, split, data_path, out):
    """Everything the tests check on two ranks, in one launch (starting processes is slow)."""
    import train
    from lib.loader import make_loader
    _collectives(env, out)
    args = equivalence_args(data_path)
    loader, dataset, sampler = make_loader(split, args, env)
    sampler.set_epoch(0)
    torch.manual_seed(100 + env.rank)  # ranks' own streams differ, as in train.py
    torch.save(train_run(args, env, loader, True), os.path.join(out, f'params{env.rank}.pt'))

    # one backward on the first global batch, relation module on: this rank's gradients after DDP
    grad_args = equivalence_args(data_path, '--warmup', '0')
    model = build_model(grad_args)
    ddp, gather = wrap_ddp(model, env, grad_args.seed)
    ddp(next(iter(loader)), 0, True, gather).loss.backward()
    torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None},
               os.path.join(out, f'grads{env.rank}.pt'))

    # trip loss and relation dropout: every rank draws the same negatives and dropout masks
    args = equivalence_args(data_path, '--base_loss', 'trip', '--gnn_loss', 'trip', '--warmup', '0')
    args.dropout = 0.0
    model = build_model(args)
    for m in model.relation.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    batch = next(iter(loader))
    ddp, gather = wrap_ddp(model, env, args.seed)
    torch.manual_seed(100 + env.rank)
    losses = [ddp(batch, 5, True, gather).loss.detach().reshape(1)]
    # without the shared stream (each rank's own seed) the ranks would disagree
    gather.shared_rng = lambda step: torch.random.fork_rng(devices=[])
    losses.append(ddp(batch, 5, True, gather).loss.detach().reshape(1))
    everyone = [torch.zeros(2) for _ in range(WORLD)]
    dist.all_gather(everyone, torch.cat(losses))
    if env.is_main:
        torch.save(everyone, os.path.join(out, 'trip0.pt'))


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory, tokenizer):
    from lib.data import PrecompSplit
    root = tmp_path_factory.mktemp('ddp')
    data_path = write_precomp(str(root / 'data'))
    split = PrecompSplit(data_path, 'tiny', 'train', tokenizer)
    out = root / 'out'
    out.mkdir()
    spawn(_two_ranks, split, data_path, str(out))  # the split travels pickled: no tokenizer to load
    return {'split': split, 'data_path': data_path, 'out': out}


def key_bias(name, value):
    """Entries of attention key biases. Their gradient is zero in exact arithmetic (softmax
    ignores a shift shared by all keys), so Adam turns rounding noise (~1e-10) into +-lr
    steps: they cannot match between any two differently-ordered computations."""
    mask = torch.zeros_like(value, dtype=torch.bool)
    if name.endswith('self_attn.in_proj_bias'):
        n = value.shape[0] // 3
        mask[n:2 * n] = True
    elif name.endswith('attention.self.key.bias'):
        mask[:] = True
    return mask


def global_batches(split, args):
    """One process's batches of 8 = rank 0's 4 items followed by rank 1's 4 (the gather order)."""
    from lib.loader import TrainDataset, collate
    dataset = TrainDataset(split, args.seed, True, True)
    per_rank = [list(torch.utils.data.DistributedSampler(dataset, WORLD, r, shuffle=True, seed=args.seed,
                                                         drop_last=True)) for r in range(WORLD)]
    return [collate([dataset[i] for r in range(WORLD) for i in per_rank[r][4 * s:4 * s + 4]])
            for s in range(args.max_steps + 1)]


def test_gradients_of_two_processes_equal_one_process(two_ranks):
    """The gradient scale itself (AdamW's steps hide a constant factor): after DDP, each rank's
    gradient equals one process's gradient of the same global batch's loss."""
    args = equivalence_args(two_ranks['data_path'], '--warmup', '0')
    model = build_model(args)
    model(global_batches(two_ranks['split'], args)[0], 0, True).loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(n.startswith('relation.') for n in reference) and any('bert' in n for n in reference)
    for r in range(WORLD):
        grads = torch.load(two_ranks['out'] / f'grads{r}.pt')
        assert set(grads) == set(reference)
        for name, ref in reference.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f'rank {r} {name}: {m}; ratio {(grads[name].norm() / ref.norm()).item()}')


def test_two_processes_equal_one_process_with_the_global_batch(two_ranks):
    from lib.distributed import DistEnv
    split, out = two_ranks['split'], two_ranks['out']

    args = equivalence_args(two_ranks['data_path'])
    batches = global_batches(split, args)
    assert len({b['regions'].shape[1] for b in batches}) > 1 or len({b['tokens'].shape[1] for b in batches}) > 1
    reference = train_run(args, DistEnv(0, 1, 0, torch.device('cpu')), batches, False)

    initial = build_model(args).state_dict()
    params = [torch.load(out / f'params{r}.pt') for r in range(WORLD)]
    for name, ref in reference.items():
        keep = ~key_bias(name, ref)
        for got in params:
            torch.testing.assert_close(got[name][keep], ref[keep], atol=1e-5, rtol=0, msg=name)
    # the run trained every part, the relation module (after --warmup) included
    for name in ('img_enc.fc.fc.weight', 'txt_enc.linear.weight', 'txt_enc.bert.embeddings.word_embeddings.weight',
                 'relation.mlp_t2i.0.weight', 'relation.transformer.layers.0.linear1.weight'):
        assert not torch.equal(reference[name], initial[name]), name

    # rows: ranks; columns: loss with the shared stream, loss with each rank's own stream
    trip = torch.stack(torch.load(out / 'trip0.pt'))
    assert trip[0, 0] == trip[1, 0]  # identical loss on both ranks with the shared stream
    assert trip[0, 1] != trip[1, 1]  # the control: ranks' own streams give different losses


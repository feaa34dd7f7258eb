"""Benchmarks: a training step, the relation module beside a per-caption loop reference,
COCO-5K evaluation beside a per-row argsort loop, the resident memory of a short training
run on a memory-mapped feature file, the training step with --compile beside eager, one
mid-epoch checkpoint save, the FLOPs of a step and of evaluation with the achieved rate, the
matrix-product peak and the loader beside the step (flops), and a step's memory per part
(memory). Prints one JSON document.

    python bench/bench.py --parts relation step eval memmap compile --text minilm

Every part runs in a fresh subprocess, so that its peak memory is its own: CUDA max allocated
on a GPU, the peak resident set size (ru_maxrss) on CPU. Times are medians over --repeat runs
after one warm-up run; ours and the loop reference alternate in one process, so that a busy
machine slows both alike (peak memory is the part's, both variants together).
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import graph_lib  # noqa: E402

# text models with random weights (BERT architecture): hidden, layers, heads, intermediate
TEXT_MODELS = {'bert-base': (768, 12, 12, 3072), 'minilm': (384, 6, 12, 1536), 'tiny': (64, 1, 2, 128)}


# ----------------------------------------------------------------------------- references

def loop_region_word_scores(regions, words, word_lengths, topk):
    """The relation module's region-word relevance as the authors structure it (lib/mca.py,
    AdjacencyLearning.forward): one caption at a time against all images. Same outputs as
    graph_lib.region_word_scores."""
    regions = F.normalize(regions, dim=-1)
    words = graph_lib.pad_positions(words, topk)
    n_img = regions.shape[0]
    t2i_topk, t2i_mean, i2t_topk, i2t_mean = [], [], [], []
    for c in range(words.shape[0]):
        n = int(word_lengths[c])
        used = max(n, topk)  # short captions use padding positions up to K
        caption = F.normalize(words[c, :used].repeat(n_img, 1, 1), dim=-1)
        sim = F.leaky_relu(torch.bmm(caption, regions.transpose(1, 2)), negative_slope=0.1)
        best_region = F.normalize(sim, dim=1).max(dim=2).values         # (images, used)
        t2i_mean.append(best_region[:, :n].mean(dim=1))
        t2i_topk.append(best_region.topk(topk, dim=1).values)
        best_word = F.normalize(sim, dim=2)[:, :n].max(dim=1).values    # (images, regions)
        i2t_mean.append(best_word.mean(dim=1))
        i2t_topk.append(best_word.topk(topk, dim=1).values)
    return (torch.stack(t2i_topk), torch.stack(t2i_mean),
            torch.stack(i2t_topk).transpose(0, 1), torch.stack(i2t_mean).t())


def loop_ranks(sims):
    """The authors' ranking: sort every row (image) and every column (caption), then search."""
    n = sims.shape[0]
    i2t = np.zeros(n)
    for i in range(n):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in range(5 * i, 5 * i + 5))
    cols = sims.T
    t2i = np.zeros(5 * n)
    for j in range(5 * n):
        order = np.argsort(cols[j])[::-1]
        t2i[j] = np.where(order == j // 5)[0][0]
    return i2t, t2i


def loop_evaluate(sims, fold5):
    out = [loop_ranks(sims)]
    if fold5:
        out += [loop_ranks(sims[i * 1000:(i + 1) * 1000, i * 5000:(i + 1) * 5000]) for i in range(5)]
    return out


# ----------------------------------------------------------------------------- measurements

def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fns, device, repeat, warmup=True):
    """Median seconds of each named function; the functions alternate (order reversed every
    round), so that a busy machine slows them alike. warmup=False: the caller ran each once."""
    times = {name: [] for name in fns}
    for fn in fns.values() if warmup else ():
        fn()  # warm-up
    for r in range(repeat):
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            sync(device)
            tick = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - tick)
    return {name: float(np.median(t)) for name, t in times.items()}, times


def peak_memory_mb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_relation_inputs(o, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, e = o.batch_size, o.embed_size
    img = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    cap = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    regions = torch.randn(b, o.regions, e, generator=g)
    words = torch.randn(b, o.tokens, e, generator=g)
    lengths = torch.randint(8, o.tokens + 1, (b,), generator=g)
    return [t.to(device) for t in (img, cap, regions, words, lengths)]


SCORES = {'ours': graph_lib.region_word_scores, 'loop': loop_region_word_scores}


def with_scores(variant, fn):
    """fn run with the relation module using our batched scores or the loop reference."""
    def run():
        graph_lib.region_word_scores = SCORES[variant]
        fn()
    return run


def measure_relation(o, device):
    """The relation module (scores, MLPs, KL, instance Transformer): forward + backward, and the
    region-word scores alone (their inputs are detached: no backward)."""
    img, cap, regions, words, lengths = random_relation_inputs(o, device)
    relation = graph_lib.InstanceRelation(o.embed_size, o.nhead, 0.1).to(device)
    img.requires_grad_()
    cap.requires_grad_()

    def fwd_bwd():
        img_hat, cap_hat, reg = relation(img, cap, regions, words, lengths)
        ((img_hat * cap).sum() + (img * cap_hat).sum() + reg).backward()

    fns = {}
    for variant, scores in SCORES.items():
        fns[f'relation_fwd_bwd/{variant}'] = with_scores(variant, fwd_bwd)
        fns[f'region_word_scores/{variant}'] = lambda scores=scores: scores(regions, words, lengths, relation.topk)
    medians, times = timed(fns, device, o.repeat)
    a, b = (scores(regions, words, lengths, relation.topk) for scores in SCORES.values())
    return {'seconds': medians, 'times': times,
            'ours_over_loop': medians['relation_fwd_bwd/ours'] / medians['relation_fwd_bwd/loop'],
            'scores_ours_over_loop': medians['region_word_scores/ours'] / medians['region_word_scores/loop'],
            'max_abs_diff': max(float((x - y).abs().max()) for x, y in zip(a, b))}


def build_model(o, device, dropout=0.1):
    """(HREM at the benchmark's sizes with the coco profile's objective, the run options of the
    coco profile, its AdamW)."""
    import arguments
    from transformers import BertConfig, BertModel
    from lib.models import HREMConfig, create_model
    from lib.optim import build_optimizer
    hidden, layers, heads, inter = TEXT_MODELS[o.text]
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=inter,
                                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))
    args = arguments.get_train_parser('coco').parse_args([])
    args.batch_size, args.precision = o.batch_size, o.precision
    coco = arguments.PROFILES['coco']
    config = HREMConfig(img_dim=o.img_dim, embed_size=o.embed_size, dropout=dropout, warmup=0,
                        trip_cutoff=coco['trip_cutoff'], mask_weight=coco['mask_weight'])
    model = create_model(config, bert).to(device)
    if getattr(o, 'grad_checkpointing', False):
        from lib.text_model import enable_grad_checkpointing
        enable_grad_checkpointing(model)
    return model, args, build_optimizer(model, args)[0]


def random_batch(o, device):
    g = torch.Generator().manual_seed(0)
    b = o.batch_size
    lengths = torch.randint(8, o.tokens + 1, (b,), generator=g)
    tokens = torch.randint(1000, 30000, (b, o.tokens), generator=g) * (torch.arange(o.tokens) < lengths[:, None])
    batch = {'regions': torch.rand(b, o.regions, o.img_dim, generator=g), 'region_lengths': torch.full((b,), o.regions),
             'tokens': tokens, 'token_lengths': lengths, 'img_ids': torch.arange(b) // 2}
    return {k: v.to(device) for k, v in batch.items()}


def training_step(model, args, optimizer, batch, device, precision, forward_context=contextlib.nullcontext,
                  mark=lambda name: None):
    """A function running one training step (as lib.engine.train_one_epoch does); it returns the loss.
    forward_context wraps the forward pass; mark(name) is called after each phase (the memory part)."""
    from lib.precision import autocast, grad_scaler
    scaler = grad_scaler(device, precision)
    params = [p for group in optimizer.param_groups for p in group['params']]
    model.train()

    def step():
        with forward_context(), autocast(device, precision):
            loss = model(batch, step=1).loss
        mark('after forward')
        scaler.scale(loss).backward()
        loss = loss.detach()
        mark('after backward')
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        mark('after the update')
        return loss
    return step


def measure_step(o, device):
    """One optimizer step after --warmup (the relation module runs): forward, backward, update,
    with our relation module and with the loop reference."""
    model, args, optimizer = build_model(o, device)
    step = training_step(model, args, optimizer, random_batch(o, device), device, o.precision)
    medians, times = timed({variant: with_scores(variant, step) for variant in SCORES}, device, o.repeat)
    b = o.batch_size
    return {'step_s': medians, 'times': times, 'samples_per_s': {k: b / v for k, v in medians.items()},
            'ours_over_loop': medians['ours'] / medians['loop'], 'text_model': o.text,
            'precision': o.precision}


def measure_compile(o, device):
    """The training step with the encoders compiled (--compile) beside the same step in eager
    mode: two copies of one model, stepped alternately. Dropout is 0, so that the first step of
    both copies (same weights, same batch, same random seed) must give the same loss."""
    import copy
    from lib.compile import check_compile, compile_encoders
    check_compile(device)
    eager, args, eager_opt = build_model(o, device, dropout=0.0)
    compiled = copy.deepcopy(eager)
    compile_encoders(compiled)
    from lib.optim import build_optimizer
    compiled_opt = build_optimizer(compiled, args)[0]
    batch = random_batch(o, device)
    steps = {'eager': training_step(eager, args, eager_opt, batch, device, o.precision),
             'compiled': training_step(compiled, args, compiled_opt, batch, device, o.precision)}
    first = {}
    for name, step in steps.items():  # the first step: the compiled one includes compilation
        torch.manual_seed(0)  # the trip loss samples negatives
        sync(device)
        tick = time.perf_counter()
        first[name] = (float(step()), time.perf_counter() - tick)
    medians, times = timed(steps, device, o.repeat)
    return {'step_s': medians, 'times': times, 'compiled_over_eager': medians['compiled'] / medians['eager'],
            'first_step_s': {k: v[1] for k, v in first.items()},
            'compile_s': first['compiled'][1] - medians['compiled'],
            'first_loss': {k: v[0] for k, v in first.items()},
            'loss_abs_diff': abs(first['compiled'][0] - first['eager'][0]), 'text_model': o.text,
            'sizes': {k: getattr(o, k) for k in ('batch_size', 'embed_size', 'regions', 'tokens', 'img_dim')}}


def measure_eval(o, device):
    """Rank a COCO-5K-sized (5000 x 25000) matrix: the full 5K protocol plus the five 1K folds,
    ours (counting) and the authors' sorting loops."""
    from lib.metrics import evaluate_sims, i2t_ranks, t2i_ranks
    # distinct float32 values (consecutive bit patterns from 0.5, shuffled): no ties, so that
    # counting and sorting must give the same ranks
    n = o.eval_images
    bits = np.uint32(0x3F000000) + np.random.default_rng(0).permutation(5 * n * n).astype(np.uint32)
    sims = bits.view(np.float32).reshape(n, 5 * n)
    fold5 = n == 5000
    tick = time.perf_counter()
    evaluate_sims(sims, fold5=fold5)
    ours = time.perf_counter() - tick
    tick = time.perf_counter()
    i2t, t2i = loop_evaluate(sims, fold5)[0]
    loop = time.perf_counter() - tick
    same = bool((i2t == i2t_ranks(sims)).all() and (t2i == t2i_ranks(sims)).all())
    return {'eval_s': {'ours': ours, 'loop': loop}, 'ours_over_loop': ours / loop, 'ranks_equal': same}


def rss_parts(pid):
    """RssAnon / RssFile of a running process in KiB (Linux), {} once it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            return {k: int(v.split()[0]) for k, v in (line.split(':', 1) for line in f)
                    if k in ('RssAnon', 'RssFile')}
    except OSError:
        return {}


def measure_memmap(o, device):
    """Peak resident memory of `train.py --max_steps 5` on a feature file of --memmap_gb GB."""
    folder = tempfile.mkdtemp(prefix='hrem_memmap_', dir=o.memmap_dir)
    try:
        precomp = os.path.join(folder, 'big_precomp')
        os.makedirs(precomp)
        # BUTD sizes (--regions x --img_dim) keep COCO's ratio of captions to feature bytes
        per_image = o.regions * o.img_dim * 4
        n_images = int(o.memmap_gb * 2**30 // per_image)
        rng = np.random.default_rng(0)
        # written in chunks with plain writes: a memory-mapped write would raise this process's
        # peak RSS, and Linux folds a parent's peak into its child's ru_maxrss at exec
        with open(os.path.join(precomp, 'train_ims.npy'), 'wb') as f:
            np.lib.format.write_array_header_1_0(
                f, {'descr': '<f4', 'fortran_order': False, 'shape': (n_images, o.regions, o.img_dim)})
            for start in range(0, n_images, 256):
                f.write(rng.random((min(256, n_images - start), o.regions, o.img_dim), dtype=np.float32).tobytes())
        words = 'a dog cat man on the beach street park with red ball'.split()
        with open(os.path.join(precomp, 'train_caps.txt'), 'w') as f:
            f.writelines(' '.join(rng.choice(words, 8)) + '\n' for _ in range(5 * n_images))
        small = rng.random((100, o.regions, o.img_dim), dtype=np.float32)
        for split in ('dev', 'test'):
            np.save(os.path.join(precomp, f'{split}_ims.npy'), small)
            with open(os.path.join(precomp, f'{split}_caps.txt'), 'w') as f:
                f.writelines(' '.join(rng.choice(words, 8)) + '\n' for _ in range(500))
        file_mb = os.path.getsize(os.path.join(precomp, 'train_ims.npy')) / 2**20
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--data_path', folder, '--dataset', 'big',
               '--bert_path', o.memmap_bert, '--embed_size', '256', '--batch_size', '64', '--max_steps', '5',
               '--num_epochs', '1', '--workers', '0', '--device', str(device), '--logger_name',
               os.path.join(folder, 'run')]
        tick = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        peaks = {}  # sampled: anonymous memory vs pages of mapped files (the page cache, shared)
        while proc.poll() is None:
            for key, kb in rss_parts(proc.pid).items():
                peaks[key] = max(peaks.get(key, 0), kb / 1024)
            time.sleep(0.2)
        if proc.returncode:
            raise RuntimeError(f'{" ".join(cmd)} failed with exit code {proc.returncode}')
        seconds = time.perf_counter() - tick
        rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {'feature_file_mb': file_mb, 'n_images': n_images, 'train_peak_rss_mb': rss_mb,
                'rss_over_file': rss_mb / file_mb, 'sampled_peak_mb': peaks, 'run_s': seconds,
                'command': ' '.join(cmd[1:])}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure_checkpoint(o, device):
    """One mid-epoch checkpoint_last.pth as train.py writes it (weights, AdamW state after one
    step, every random state; copied off the device, saved, fsynced, renamed) into --save_dir."""
    from torch.utils.tensorboard import SummaryWriter
    from lib.distributed import DistEnv
    from lib.training import TrainState, save_last_checkpoint
    from lib.precision import grad_scaler
    model, args, optimizer = build_model(o, device)
    model(random_batch(o, device), step=1).loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    state = TrainState(0, 1)
    state.position = 1
    folder = tempfile.mkdtemp(dir=o.save_dir)
    try:
        args.logger_name = folder
        writer = SummaryWriter(folder)

        def save():
            save_last_checkpoint(model, args, DistEnv(0, 1, 0, device), state, optimizer, scheduler,
                                  grad_scaler(device, o.precision), writer, True)
        medians, times = timed({'save': save}, device, o.repeat)
        writer.close()
        size = os.path.getsize(os.path.join(folder, 'checkpoint_last.pth'))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {'save_s': medians['save'], 'times': times, 'file_mb': size / 2**20, 'text_model': o.text,
            'parameters_m': sum(p.numel() for p in model.parameters()) / 1e6}


def rss_mb():
    """(current, peak) resident set size of this process in MB (Linux /proc/self/status)."""
    with open('/proc/self/status') as f:
        fields = {k: int(v.split()[0]) for k, v in (line.split(':', 1) for line in f) if k in ('VmRSS', 'VmHWM')}
    return fields['VmRSS'] / 1024, fields['VmHWM'] / 1024


def reset_peak_memory(device):
    """Start a new peak: CUDA's max allocated, or the peak RSS (VmHWM; Linux resets it when "5" is
    written to /proc/self/clear_refs)."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass
    return rss_mb()[0]


def peak_since_reset(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == 'cuda' else rss_mb()[1]


def measure_precision(o, device):
    """The training step in fp32 and in bf16 (--precision): two copies of one model (same
    weights), the same batch, stepped alternately in this process. The first step of each starts
    from the same weights and random seed (dropout masks and the trip loss's negatives are then the
    same), so their losses must agree to bf16's rounding. Memory: the peak of each copy's first
    step (CUDA max allocated, or the peak RSS with both copies resident) and what the step adds."""
    import copy
    from lib.optim import build_optimizer
    from lib.precision import bf16_support
    fp32, args, fp32_opt = build_model(o, device)
    bf16 = copy.deepcopy(fp32)
    bf16_opt = build_optimizer(bf16, args)[0]
    batch = random_batch(o, device)
    steps = {'fp32': training_step(fp32, args, fp32_opt, batch, device, 'fp32'),
             'bf16': training_step(bf16, args, bf16_opt, batch, device, 'bf16')}
    first, memory = {}, {}
    for name, step in steps.items():
        torch.manual_seed(0)  # dropout and the trip loss's negatives
        sync(device)
        before = reset_peak_memory(device)
        tick = time.perf_counter()
        loss = float(step())
        sync(device)
        first[name] = (loss, time.perf_counter() - tick)
        peak = peak_since_reset(device)
        memory[name] = {'peak_mb': peak, 'step_adds_mb': peak - before}
    medians, times = timed(steps, device, o.repeat, warmup=False)  # the first steps warmed up
    loss32, loss16 = first['fp32'][0], first['bf16'][0]
    del bf16, bf16_opt, steps
    agreement = gradient_agreement(fp32, args, batch, device)
    return {'step_s': medians, 'times': times, 'bf16_over_fp32': medians['bf16'] / medians['fp32'],
            'bf16_over_fp32_paired': paired_ratio(times),
            'samples_per_s': {k: o.batch_size / v for k, v in medians.items()},
            'first_step_s': {k: v[1] for k, v in first.items()}, 'first_loss': {k: v[0] for k, v in first.items()},
            'loss_rel_diff': abs(loss16 - loss32) / abs(loss32), 'memory': memory, 'text_model': o.text,
            'bf16_support': bf16_support(device), 'gradients': agreement,
            'sizes': {k: getattr(o, k) for k in ('batch_size', 'embed_size', 'regions', 'tokens', 'img_dim')}}


def gradient_agreement(model, args, batch, device):
    """Per parameter group of the optimizer: the cosine between the gradients of one batch in fp32
    and in bf16, from the same weights and random seed, and the ratio of their norms (bf16 / fp32)."""
    import copy
    from lib.precision import autocast
    grads = {}
    for precision, copy_ in (('fp32', model), ('bf16', copy.deepcopy(model))):
        copy_.train()
        copy_.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with autocast(device, precision):
            loss = copy_(batch, step=1).loss
        loss.backward()
        grads[precision] = {g['name']: torch.cat([p.grad.flatten().double() for p in g['params'] if p.grad is not None])
                            for g in copy_.parameter_groups(args.learning_rate, args.bert_lr_factor,
                                                             args.graph_lr_factor)}
        copy_.zero_grad(set_to_none=True)
    return {name: {'cosine': float(torch.nn.functional.cosine_similarity(g32, grads['bf16'][name], dim=0)),
                   'norm_ratio': float(grads['bf16'][name].norm() / g32.norm())}
            for name, g32 in grads['fp32'].items()}


def paired_ratio(times):
    """Median over rounds of bf16 / fp32 within each round: the two runs of a round are next to each
    other in time, so a load that changes between rounds cancels better than in the ratio of medians."""
    return float(np.median(np.array(times['bf16']) / np.array(times['fp32'])))


def synthetic_split(o, n_images, seed=0):
    """A split of random region features and random captions (5 per image, 8 to --tokens pieces)
    in the shape lib.encoding.split_sims reads."""
    from types import SimpleNamespace
    from lib.data import TokenizedCaptions
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, o.tokens - 1, 5 * n_images)
    ids = rng.integers(1000, 30000, int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    word_index = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    text = SimpleNamespace(encode=lambda pieces, words: np.concatenate(([101], pieces, [102])).astype(np.int64))
    return SimpleNamespace(images=rng.random((n_images, o.regions, o.img_dim), dtype=np.float32),
                           tokens=TokenizedCaptions(ids, word_index, offsets), text=text, n_images=n_images)


def measure_precision_eval(o, device):
    """Evaluation encoding (every image and caption of a split, then ranking) in fp32 and bf16,
    alternating. With --eval_checkpoint: that model on its test split (its rsum is meaningful);
    otherwise a random model at the benchmark's sizes on --precision_images random images."""
    from lib.encoding import split_sims
    from lib.metrics import evaluate_sims
    if o.eval_checkpoint:
        import arguments
        from lib.data import PrecompSplit
        from lib.models import load_model
        model, _, tokenizer, options = load_model(o.eval_checkpoint, device)
        dataset = options['dataset']
        split = PrecompSplit(options['data_path'], dataset, arguments.test_split_of(dataset), tokenizer)
        source = f'{o.eval_checkpoint} on {dataset}/{arguments.test_split_of(dataset)}'
    else:
        model = build_model(o, device)[0].eval()
        split = synthetic_split(o, o.precision_images)
        source = f'random weights ({o.text}), {o.precision_images} random images'
    sims = {}

    def encode(precision):
        def run():
            sims[precision] = split_sims(model, split, device, o.eval_batch_size, precision)
        return run
    medians, times = timed({p: encode(p) for p in ('fp32', 'bf16')}, device, o.repeat)
    results = {p: evaluate_sims(s)[0] for p, s in sims.items()}
    return {'encode_s': medians, 'times': times, 'bf16_over_fp32': medians['bf16'] / medians['fp32'],
            'bf16_over_fp32_paired': paired_ratio(times),
            'rsum': {p: r['rsum'] for p, r in results.items()},
            'recalls': {p: [r[side][f'r{k}'] for side in ('i2t', 't2i') for k in (1, 5, 10)] for p, r in results.items()},
            'sims_max_abs_diff': float(np.abs(sims['fp32'] - sims['bf16']).max()),
            'n_images': int(split.n_images), 'n_captions': len(split.tokens), 'source': source,
            'text_model': None if o.eval_checkpoint else o.text}

def matmul_peak(o, device):
    """FLOP/s of a large square matrix product in the step's precision: what this device reaches
    at best on the operation that dominates the step."""
    n = 8192 if device.type == 'cuda' else 3072
    dtype = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[o.precision]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    medians, _ = timed({'mm': lambda: torch.mm(a, b)}, device, max(o.repeat, 5))
    return 2 * n ** 3 / medians['mm']


def loader_rate(o):
    """Samples/s of this project's training loader alone (bench/loader.py, run as a script: one
    process, no workers) at this part's batch and region sizes."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'loader.py')
    run = subprocess.run([sys.executable, script, '--json', '--loaders', 'ours', '--workers', '0',
                          '--images', str(o.loader_images), '--epochs', '1', '--batch_size', str(o.batch_size),
                          '--regions', str(o.regions), '--img_dim', str(o.img_dim)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f'bench/loader.py failed:\n{run.stderr[-2000:]}')
    return json.loads(run.stdout.strip().splitlines()[-1])['ours']['0']


def measure_flops(o, device):
    """FLOPs of one training step (forward, backward, update; relation module active) and of
    evaluation, counted by torch.utils.flop_counter (matrix products, attention, convolutions;
    elementwise operations are not counted); the step's achieved rate against the device's
    measured matrix-product peak; the loader's samples/s beside the step's."""
    from torch.utils.flop_counter import FlopCounterMode
    model, args, optimizer = build_model(o, device)
    batch = random_batch(o, device)
    step = training_step(model, args, optimizer, batch, device, o.precision)
    with FlopCounterMode(display=False) as counter:
        step()
    step_flops = counter.get_total_flops()
    # per module, the forward pass only: the counter's module attribution of the backward pass is
    # unreliable here (the encoders' gradients are computed while the relation module's backward
    # is still open, and counted under both)
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(batch, step=1)
    by_module = {k: sum(v.values()) for k, v in forward.get_flop_counts().items() if k.count('.') == 1}
    medians, times = timed({'step': step}, device, o.repeat, warmup=False)
    step_s = medians['step']
    peak = matmul_peak(o, device)
    # evaluation: each image and caption encoded once, then one product of the two embedding matrices
    # (counted without autocast, which the counter's dispatch mode trips in the Transformer's
    # inference path; a count does not depend on the precision)
    model.eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as images:
            model.encode_image(batch['regions'], batch['region_lengths'])
        with FlopCounterMode(display=False) as captions:
            model.encode_text(batch['tokens'], batch['token_lengths'])
    b, e = o.batch_size, o.embed_size
    per_image, per_caption = images.get_total_flops() / b, captions.get_total_flops() / b
    evaluation = {name: n_img * per_image + 5 * n_img * per_caption + 2 * e * n_img * 5 * n_img
                  for name, n_img in (('f30k_1k_test', 1000), ('coco_5k_test', 5000))}
    loader = loader_rate(o) if o.loader_images else None
    step_rate = b / step_s
    return {'step_flops': step_flops, 'forward_flops': forward.get_total_flops(),
            'forward_flops_by_module': by_module, 'step_s': step_s, 'times': times['step'],
            'achieved_flops_per_s': step_flops / step_s, 'matmul_peak_flops_per_s': peak,
            'achieved_over_peak': step_flops / step_s / peak,
            'eval_flops_per_image': per_image, 'eval_flops_per_caption': per_caption,
            'eval_flops_similarity_per_pair': 2 * e, 'eval_flops': evaluation,
            'step_samples_per_s': step_rate, 'loader_samples_per_s': loader,
            'limited_by': None if loader is None else ('the step' if step_rate < loader else 'the loader'),
            'text_model': o.text, 'precision': o.precision, 'grad_checkpointing': o.grad_checkpointing,
            'sizes': {k: getattr(o, k) for k in ('batch_size', 'embed_size', 'regions', 'tokens', 'img_dim')}}


MEMORY_VARIANTS = ('ours', 'grad_checkpointing', 'loop', 'loop+grad_checkpointing')


def measure_memory(o, device):
    """Memory of one training step (relation module active) per part, counted tensor by tensor
    (lib/memory_accounting.py): weights, gradients, AdamW state, what each module keeps for the
    backward pass, the live total after forward and backward, and the step's peak. Variants: this
    project, with --grad_checkpointing, and with the relation module's region-word scores
    structured as the authors' code does (one caption at a time: bench's loop reference)."""
    from lib.memory_accounting import (SavedActivations, TensorMemory, optimizer_state_bytes,
                                       parameter_bytes)
    out = {}
    for variant in o.memory_variants:
        graph_lib.region_word_scores = SCORES['loop' if 'loop' in variant else 'ours']
        o.grad_checkpointing = 'grad_checkpointing' in variant  # build_model applies it
        model, args, optimizer = build_model(o, device)
        params = [p for group in optimizer.param_groups for p in group['params']]
        for p in params:  # the optimizer state exists, as from a run's second step on
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = random_batch(o, device)
        parts = {'text backbone': model.txt_enc.bert, 'text head': model.txt_enc, 'image encoder': model.img_enc,
                 'relation module': model.relation}
        weights = list(model.parameters()) + list(model.buffers())
        state = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        saved = SavedActivations(parts, weights=weights)
        memory = TensorMemory()
        step = training_step(model, args, optimizer, batch, device, o.precision, forward_context=saved,
                             mark=memory.mark)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
        memory.track(weights + state + list(batch.values()))
        start = memory.live
        tick = time.perf_counter()
        with memory:
            step()
        sync(device)
        out[variant] = {
            'weights_bytes': parameter_bytes(model) + sum(b.numel() * b.element_size() for b in model.buffers()),
            'gradient_bytes': parameter_bytes(model, trainable_only=True),
            'optimizer_state_bytes': optimizer_state_bytes(optimizer),
            'batch_bytes': sum(v.numel() * v.element_size() for v in batch.values()),
            'saved_for_backward_bytes': saved.by_part,
            'live_bytes': {'before the step': start, **{k: v[0] for k, v in memory.marks.items()}},
            'peak_bytes_by_phase': {k.replace('after', 'during'): v[1] for k, v in memory.marks.items()},
            'peak_bytes': memory.peak, 'step_s_while_counting': time.perf_counter() - tick,
            'cuda_max_allocated_bytes': torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None}
        del model, optimizer, batch, params, weights, state, memory, saved, step
    graph_lib.region_word_scores = SCORES['ours']
    o.grad_checkpointing = False
    return {'variants': out, 'text_model': o.text, 'precision': o.precision,
            'sizes': {k: getattr(o, k) for k in ('batch_size', 'embed_size', 'regions', 'tokens', 'img_dim')}}


# a name that runs several parts, each in its own subprocess
GROUPS = {'precision': ['precision_step', 'precision_eval']}
PARTS = {'relation': measure_relation, 'step': measure_step, 'eval': measure_eval, 'memmap': measure_memmap,
         'compile': measure_compile, 'checkpoint': measure_checkpoint, 'precision_step': measure_precision,
         'precision_eval': measure_precision_eval, 'flops': measure_flops, 'memory': measure_memory}


def child(o):
    device = torch.device(o.device)
    if o.threads:
        torch.set_num_threads(o.threads)
    torch.manual_seed(0)
    result = PARTS[o.part](o, device)
    result['peak_memory_mb'] = peak_memory_mb(device)
    print(json.dumps(result))


def parse(argv=None):
    from lib.text_model import DEMO_TEXT_MODEL
    import arguments
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    p.add_argument('--parts', nargs='+', default=['relation', 'step', 'eval'], choices=list(PARTS) + list(GROUPS),
                   help='what to measure')
    p.add_argument('--batch_size', type=int, default=128, help='pairs per training step')
    p.add_argument('--embed_size', type=int, default=1024, help='joint embedding size E')
    p.add_argument('--nhead', type=int, default=16, help='attention heads')
    p.add_argument('--regions', type=int, default=36, help='regions per image')
    p.add_argument('--tokens', type=int, default=32, help='longest caption in tokens (lengths drawn from 8 on)')
    p.add_argument('--img_dim', type=int, default=2048, help='region feature size')
    p.add_argument('--text', default='bert-base', choices=list(TEXT_MODELS),
                   help='text model sizes for the step (random weights)')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'], help='autocast precision of the step')
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu; when not given: cuda when present, else cpu')
    p.add_argument('--repeat', type=int, default=3, help='timed repetitions (the median is reported)')
    p.add_argument('--threads', type=int, default=0, help='CPU threads of torch (0: its default)')
    p.add_argument('--eval_images', type=int, default=5000, help='images of the ranked matrix (5000: COCO 5K with the five 1K folds)')
    p.add_argument('--memmap_gb', type=float, default=2.5, help='size of the feature file of the memmap part')
    p.add_argument('--memmap_dir', default=tempfile.gettempdir(), help='where that file is written (and deleted)')
    p.add_argument('--memmap_bert', default=DEMO_TEXT_MODEL, help='text model folder for the memmap training run')
    p.add_argument('--save_dir', default=tempfile.gettempdir(),
                   help='where the checkpoint part writes (and deletes) its file: the disk of your runs')
    p.add_argument('--precision_images', type=int, default=1000,
                   help='images of the random split of the precision_eval part (five captions each)')
    p.add_argument('--eval_checkpoint', default=None,
                   help='precision_eval: encode the test split of this checkpoint instead of a random model')
    p.add_argument('--eval_batch_size', type=int, default=128, help='encoding batch size of precision_eval')
    p.add_argument('--loader_images', type=int, default=1000,
                   help='flops: images of the loader measurement beside the step (0: skip it)')
    p.add_argument('--memory_variants', nargs='+', default=list(MEMORY_VARIANTS[:3]), choices=MEMORY_VARIANTS,
                   help='memory: this project, with --grad_checkpointing, the authors\' relation structure, both')
    p.add_argument('--grad_checkpointing', action='store_true',
                   help='step, flops: the text backbone with activation checkpointing (train.py --grad_checkpointing)')
    p.add_argument('--out', default=None, help='also write the JSON to this file')
    p.add_argument('--part', help=argparse.SUPPRESS)
    o = p.parse_args(argv)
    o.device = o.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    return o


def main(argv=None):
    o = parse(argv)
    if o.part:
        return child(o)
    report = {'machine': {'platform': platform.platform(), 'processor': platform.processor(),
                          'cpus': os.cpu_count(), 'cpu_capability': torch.backends.cpu.get_cpu_capability(),
                          'load_average': os.getloadavg(), 'torch': torch.__version__,
                          'gpu': torch.cuda.get_device_name() if o.device.startswith('cuda') else None},
              'options': {k: v for k, v in vars(o).items() if k not in ('part', 'out')}, 'results': {}}
    argv = sys.argv[1:] if argv is None else argv
    for part in [p for name in o.parts for p in GROUPS.get(name, [name])]:
        run = subprocess.run([sys.executable, __file__, *argv, '--part', part], capture_output=True, text=True)
        if run.returncode:
            sys.exit(f'{part} failed:\n{run.stderr[-3000:]}')
        report['results'][part] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f'{part}: {report["results"][part]}', file=sys.stderr, flush=True)
    text = json.dumps(report, indent=1)
    print(text)
    if o.out:
        from lib.writing import atomic_write
        with atomic_write(o.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()

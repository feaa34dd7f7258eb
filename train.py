"""Train HREM. `python train.py` trains the built-in demo; see docs/training.md for Flickr30K and COCO.

Single process (CPU or one GPU) or `torchrun --nproc_per_node N train.py ...`.
"""
import logging
import math
import os
import random
import signal
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import arguments
from lib import checkpoint as ckpt_lib
from lib import run_folder
from lib.compile import check_compile, compile_encoders
from lib.data import PrecompSplit, check_feature_sizes
from lib.demo_data import ensure_demo
from lib.distributed import all_gather_objects, all_max, barrier, cleanup, init_distributed, wrap_ddp
from lib.engine import TrainState, train_one_epoch, unwrap, validate
from lib.errors import UserError, exit_on_user_error
from lib.loader import make_loader
from lib.evaluation import evaluate_sims, format_result, save_sims
from lib.model import HREM, build_optimizer
from lib.precision import bf16_warning, check_precision, grad_scaler, set_tf32
from lib.resume import CheckpointSchedule, StopSignals, rng_state
from lib.text_model import load_text_backbone, load_tokenizer
from lib.token_cache import resolve_cache_dir

logger = logging.getLogger('hrem')

# Options a resumed run may change; everything else is taken from the checkpoint.
RESUME_OVERRIDES = ('device', 'workers', 'resume', 'max_steps', 'num_epochs', 'log_step', 'eval_batch_size',
                    'data_path', 'bert_path', 'max_nonfinite', 'checkpoint_every', 'checkpoint_minutes', 'compile',
                    'tf32', 'cache_dir')


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_args(argv):
    args = arguments.parse_train_args(argv)
    if args.resume and args.init_from:
        raise UserError('--resume continues a run, --init_from starts a new one from weights: give one of them')
    if args.resume:
        saved = ckpt_lib.read_checkpoint(args.resume)
        if saved['format'] != ckpt_lib.FORMAT or saved.get('optimizer') is None:
            raise UserError(f'{args.resume} cannot be resumed (no optimizer state); '
                            'use --init_from to start a new run from its weights')
        # only what the command line names explicitly overrides the run's saved options
        given, unset = arguments.get_train_parser(), object()
        given.set_defaults(**{k: unset for k in vars(args)})
        explicit = {k: v for k, v in vars(given.parse_args(argv)).items() if v is not unset}
        changed = sorted(k for k, v in explicit.items()
                         if k not in RESUME_OVERRIDES and k in saved['args'] and v != saved['args'][k])
        if changed:
            raise UserError(f'--resume continues the run with its own options; --{changed[0]} cannot change '
                            f'(the run used {saved["args"][changed[0]]!r}). Options a resumed run may change: '
                            + ', '.join(f'--{k}' for k in RESUME_OVERRIDES))
        merged = {**vars(args), **saved['args'], **{k: explicit[k] for k in RESUME_OVERRIDES if k in explicit}}
        merged['logger_name'] = os.path.dirname(os.path.abspath(args.resume))
        merged['init_from'] = None  # the run's weights now come from --resume
        merged['max_steps'] = args.max_steps  # a limit of one invocation: a resume without it runs to the end
        args = arguments.argparse.Namespace(**merged)
        return args, saved
    return args, None


def check_args(args, env):
    check_precision(env.device, args.precision)
    set_tf32(env.device, args.tf32)  # refused on CPU; on CUDA it covers validation and testing too
    if args.batch_size < 2:
        raise UserError(f'--batch_size {args.batch_size}: a batch needs at least 2 pairs to have negatives')
    if args.batch_size % env.world_size:
        raise UserError(f'--batch_size {args.batch_size} is the global batch; it must divide evenly over '
                        f'{env.world_size} processes')
    if args.checkpoint_every < 0 or args.checkpoint_minutes < 0:
        raise UserError('--checkpoint_every and --checkpoint_minutes must be >= 0 (0 turns each off)')
    if int(args.batch_size * args.threshold) < 1:
        raise UserError(f'--threshold {args.threshold} keeps no connection in a batch of {args.batch_size}; '
                        'raise it so that batch_size * threshold >= 1')
    if args.embed_size % args.nhead:
        raise UserError(f'--embed_size {args.embed_size} must be divisible by --nhead {args.nhead}')
    if not args.dataset or os.path.basename(args.dataset) != args.dataset or args.dataset in ('.', '..'):
        raise UserError(f'--dataset {args.dataset!r} must be a plain name (its files are read from '
                        '<data_path>/<dataset>_precomp/); give the folder above it with --data_path')
    if args.compile:
        check_compile(env.device)  # last: it takes seconds


def evaluate_best(model, args, env, split, writer, state, mid_epoch, started):
    """Evaluate model_best.pth on the dataset's test protocol; write results.json and sims.
    A run stopped inside its first epoch has no model_best.pth: its current weights (those of
    checkpoint_last.pth) are evaluated instead. `started`: time.time() when this process began
    (a resumed run counts from its resume)."""
    folder = args.logger_name
    best_path = os.path.join(folder, run_folder.BEST)
    if mid_epoch and not os.path.isfile(best_path):
        name, epoch, step = run_folder.LAST, state.epoch, state.step
    else:
        best = ckpt_lib.read_checkpoint(best_path)
        ckpt_lib.load_model_weights(unwrap(model), best, best_path)
        name, epoch, step = run_folder.BEST, best['epoch'], best['iteration']
    split_name = arguments.test_split_of(args.dataset)
    logger.info(f'evaluating {name} (epoch {epoch}, step {step}) on {split_name}')
    _, sims = validate(model, split, args, env)
    results = evaluate_sims(sims, fold5=args.dataset == 'coco' and split.n_images == 5000)
    for r in results[1:]:
        logger.info(format_result(r))
    extra = {'split': split_name, 'checkpoint': name, 'epoch': epoch}
    extended = coco_extended(args, split, split_name, sims)
    if extended is not None:
        extra['extended'] = extended
    run_folder.write_results(folder, results, {**extra, 'wall_time_s': round(time.time() - started, 1)})
    save_sims(os.path.join(folder, f'results_{args.dataset}.npy'), sims)
    if writer is not None:
        # a stopped epoch logs at the stop step: a resumed run purges it and logs its own
        writer.add_scalar('test/rsum', results[0]['rsum'], state.step if mid_epoch else step)
        for key, sides in (extended or {}).items():
            for side, value in sides.items():
                writer.add_scalar(f'test/{key}_{side}', value, state.step if mid_epoch else step)
    return results


def coco_extended(args, split, split_name, sims):
    """ECCV Caption and CxC metrics of a COCO 5K test matrix (lib/extended_metrics.py), or None
    for any other split; a split whose ids files disagree with the Karpathy order is logged and
    left out rather than failing a finished run."""
    from lib import extended_metrics
    if args.dataset != 'coco' or tuple(sims.shape) != (extended_metrics.N_IMAGES, extended_metrics.N_CAPTIONS):
        return None
    try:
        extended_metrics.check_split_ids(os.path.dirname(split.ims_path), split_name)
        extended = extended_metrics.extended_metrics(sims)
    except UserError as err:
        logger.info(f'ECCV Caption / CxC metrics left out: {err}')
        return None
    for line in extended_metrics.format_extended(extended).splitlines():
        logger.info(f'ECCV Caption / CxC {line}')
    return extended


def resume_position(ckpt, env, n_batches, source):
    """(batches taken, this rank's random state) where a mid-epoch checkpoint left its epoch;
    (0, None) for one taken at an epoch's end (also every checkpoint of older versions)."""
    position = ckpt.get('position')
    if not position:
        return 0, None
    if position['world_size'] != env.world_size:
        raise UserError(f'{source} was written inside an epoch by {position["world_size"]} process(es); resume it '
                        f'with as many (this run has {env.world_size}), or resume from an epoch\'s end checkpoint')
    if position['batches'] >= n_batches:
        raise UserError(f'{source} was written after batch {position["batches"]} of an epoch, but an epoch of '
                        f'this training split has {n_batches} batches; resume with the data it was trained on')
    return position['batches'], position['rng'][env.rank]


def last_checkpoint(model, args, env, state, optimizer, scheduler, scaler, writer, mid_epoch):
    """Write checkpoint_last.pth at an epoch's end (rank 0 calls it) or, with the position and
    every rank's random state, after state.position batches of an epoch (every rank calls it)."""
    position = None
    if mid_epoch:
        position = {'batches': state.position, 'world_size': env.world_size,
                    'rng': all_gather_objects(rng_state(env.device), env)}
    if env.is_main:
        writer.flush()  # the events up to this step reach the disk before a checkpoint that keeps them
        ckpt = ckpt_lib.make_checkpoint(model, args, state.epoch if mid_epoch else state.epoch + 1, state.step,
                                        state.best_rsum, optimizer, scheduler, scaler, state.counters(), position)
        ckpt_lib.save_atomic(ckpt, os.path.join(args.logger_name, run_folder.LAST), resume_advice(args.logger_name))
        return ckpt


def resume_advice(folder):
    """What to do after a failed save: continue from checkpoint_last.pth when there is one."""
    last = os.path.join(folder, run_folder.LAST)
    return f'continue with --resume {last} once the cause is fixed' if os.path.isfile(last) else None


@exit_on_user_error
def main(argv=None):
    started = time.time()
    args, resume_ckpt = resolve_args(argv)
    env = init_distributed(args.device)
    check_args(args, env)
    if env.is_main:  # before any data is read: a wrong --logger_name costs seconds, not an epoch
        run_folder.check_run_folder(args.logger_name)
    args.device = str(env.device)
    if args.dataset == 'demo':
        if env.is_main:
            ensure_demo(args.data_path)
        barrier(env)

    # cheap checks of every input first: nothing is created or built when one fails
    tokenizer = load_tokenizer(args.bert_path)
    train_split, val_split, test_split = (
        PrecompSplit(args.data_path, args.dataset, name, tokenizer, show_progress=env.is_main,
                     cache_dir=resolve_cache_dir(getattr(args, 'cache_dir', None)))
        for name in ('train', args.val_split, arguments.test_split_of(args.dataset)))
    check_feature_sizes([train_split, val_split, test_split])
    for split in (val_split, test_split):
        split.check_finite()  # the training split is checked image by image as it is read
    init = resume_ckpt or (ckpt_lib.read_checkpoint(args.init_from) if args.init_from else None)
    source = args.resume or args.init_from
    if init is not None:
        arch = ckpt_lib.architecture(init)
        if arch['img_dim'] != train_split.feature_size:
            raise UserError(f'{source} expects {arch["img_dim"]}-d region features; {train_split.ims_path} has '
                            f'{train_split.feature_size}')
        if arch['embed_size'] != args.embed_size:
            raise UserError(f'{source} has embedding size {arch["embed_size"]}, this run --embed_size '
                            f'{args.embed_size}; pass --embed_size {arch["embed_size"]}')

    folder = args.logger_name
    if env.is_main:
        run_folder.prepare_run_folder(folder, resuming=resume_ckpt is not None, overwrite=args.overwrite)
        run_folder.write_options(folder, args)
    barrier(env)
    run_folder.setup_logger(folder, append=resume_ckpt is not None, enabled=env.is_main)
    logger.info(f'run folder {folder}; device {env.device} x {env.world_size} process(es); precision {args.precision}')
    if bf16_warning(env.device, args.precision):
        logger.warning(bf16_warning(env.device, args.precision))
    for note in dict.fromkeys(s.cache_note for s in (train_split, val_split, test_split) if s.cache_note):
        logger.info(note)
    logger.info(f'train: {train_split.n_images} images, {len(train_split.captions)} captions; '
                f'{args.val_split}: {val_split.n_images} images, {len(val_split.captions)} captions')

    bert = load_text_backbone(args.bert_path, pretrained=init is None)
    seed_all(args.seed)  # the initial weights depend on the seed only
    model = HREM(args, train_split.feature_size, bert)
    if init is not None:
        ckpt_lib.load_model_weights(model, init, source, relation=resume_ckpt is not None)
        for key, saved, now in ckpt_lib.option_differences(init, args):
            logger.warning(f'{source} was trained with --{key} {saved}; this run uses {now}')
    model.to(env.device)
    if args.compile:
        compile_encoders(model)
    optimizer, scheduler = build_optimizer(model, args)
    scaler = grad_scaler(env.device, args.precision)
    state = TrainState()
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt['optimizer'])
        scheduler.load_state_dict(resume_ckpt['scheduler'])
        if resume_ckpt.get('scaler'):
            scaler.load_state_dict(resume_ckpt['scaler'])
        state = TrainState(resume_ckpt['epoch'], resume_ckpt['iteration'], resume_ckpt['best_rsum'],
                           **resume_ckpt.get('counters', {}))

    train_model, gather = model, None
    if env.distributed:
        train_model, gather = wrap_ddp(model, env, args.seed)

    loader, dataset, sampler = make_loader(train_split, args, env)
    n_batches = len(loader)
    start, rng = resume_position(resume_ckpt, env, n_batches, args.resume) if resume_ckpt else (0, None)
    if resume_ckpt is not None:
        logger.info(f'resumed from {args.resume}: epoch {state.epoch}, step {state.step}, batch {start} of the epoch')
    # purge_step drops events a killed run logged after its last checkpoint
    writer = SummaryWriter(folder, purge_step=state.step if resume_ckpt else None) if env.is_main else None
    logger.info(f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; '
                f'{n_batches} steps per epoch; relations start at step {args.warmup}')

    schedule = CheckpointSchedule(args.checkpoint_every, args.checkpoint_minutes)
    mid_epoch, signum = False, 0
    with StopSignals() as stop:
        def after_step():
            """Mid-epoch: a checkpoint when one is due; True when a signal asks every rank to stop."""
            nonlocal signum
            signum, due = all_max([stop.signum, int(schedule.due(state.step))], env)
            if due and not signum:  # a stop writes its own checkpoint
                last_checkpoint(model, args, env, state, optimizer, scheduler, scaler, writer, True)
                schedule.saved()
            return bool(signum)

        for epoch in range(state.epoch, args.num_epochs):
            state.epoch, state.position = epoch, start
            if args.max_steps and state.step >= args.max_steps:
                mid_epoch = start > 0  # checkpoint_last.pth already holds this position
                break
            # every random choice of an epoch derives from (seed, rank, epoch): resuming repeats it
            seed_all(args.seed + 1000 * epoch + env.rank)
            sampler.set_epoch(epoch)
            sampler.start = start * loader.batch_size  # a mid-epoch resume skips the batches taken
            dataset.set_epoch(epoch)
            finished = train_one_epoch(train_model, loader, optimizer, scaler, state, args, env, writer, gather,
                                       after_step, rng)
            start, rng = 0, None
            if not finished:  # stopped by --max_steps or a signal: validation stays at epochs' ends
                mid_epoch = True
                last_checkpoint(model, args, env, state, optimizer, scheduler, scaler, writer, True)
                break
            scheduler.step()
            if env.is_main:
                # logged at the epoch's last step: a resumed run purges events from state.step on
                results, _ = validate(model, val_split, args, env, state.step - 1, writer)
                rsum = results[0]['rsum']
                is_best = rsum > state.best_rsum or not math.isfinite(state.best_rsum)
                state.best_rsum = max(rsum, state.best_rsum)
                logger.info(f'epoch {epoch}: {args.val_split} rsum {rsum:.1f} (best {state.best_rsum:.1f})')
                ckpt = last_checkpoint(model, args, env, state, optimizer, scheduler, scaler, writer, False)
                if is_best:
                    ckpt_lib.save_atomic(ckpt, os.path.join(folder, run_folder.BEST), resume_advice(folder))
            schedule.saved()
            barrier(env)
            signum = all_max([stop.signum], env)[0]  # a signal during validation stops before the next epoch
            if signum:
                break

    where = f'step {state.step} (epoch {state.epoch}, batch {state.position} of {n_batches})'
    resume_cmd = f'--resume {os.path.join(folder, run_folder.LAST)}'
    if signum:
        logger.warning(f'stopped by {signal.Signals(signum).name} at {where}; checkpoint_last.pth holds it. Continue '
                       f'with the same command line (and launcher) given only {resume_cmd}')
        if writer is not None:
            writer.close()
        cleanup(env)
        raise SystemExit(128 + signum)  # the shell's status for "ended by this signal"
    if args.max_steps and state.step >= args.max_steps:
        logger.info(f'stopped after --max_steps {args.max_steps} at {where}; continue with {resume_cmd} '
                    'and a larger --max_steps (or none)')
    if env.is_main:
        results = evaluate_best(model, args, env, test_split, writer, state, mid_epoch, started)
        writer.close()
        logger.info(f'done: test rsum {results[0]["rsum"]:.1f}; results in {os.path.join(folder, run_folder.RESULTS)}')
    barrier(env)
    cleanup(env)


if __name__ == '__main__':
    main()

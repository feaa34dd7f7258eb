"""One training epoch and one validation pass."""
import logging
import time

import torch

from lib.distributed import all_finite
from lib.errors import UserError
from lib.evaluation import RECALL_AT, evaluate_sims, format_result, split_sims
from lib.precision import autocast
from lib.progress import progress
from lib.resume import set_rng_state

logger = logging.getLogger('hrem')


def unwrap(model):
    """The HREM module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, 'module', model)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_one_epoch(model, loader, optimizer, scaler, state, args, env, writer=None, gather=None,
                    after_step=None, rng=None):
    """Train on the epoch's batches from state.position on (the loader yields only those).

    After each optimizer step that is not the epoch's last, stop when --max_steps is reached or
    after_step() returns True. rng: the random states to continue from (a mid-epoch resume).
    Returns False when stopped before the epoch's end.
    """
    model.train()
    max_violation = args.max_violation or state.epoch >= args.vse_mean_warmup_epochs
    params = [p for g in optimizer.param_groups for p in g['params']]
    n_batches = state.position + len(loader)
    batches = iter(loader)  # draws the workers' base seed from the torch RNG, as at every epoch's start
    if rng is not None:
        set_rng_state(rng, env.device)
    # off where stderr is no terminal (train.log has the log lines) and on ranks other than 0
    bar = progress(batches, enabled=env.is_main, desc=f'epoch {state.epoch}', total=n_batches, initial=state.position)
    tick = time.perf_counter()
    for batch in bar:
        state.position += 1
        batch = to_device(batch, env.device)
        with autocast(env.device, args.precision):
            out = model(batch, state.step, max_violation, gather)
        if not all_finite(out.loss, env):  # every rank skips the same steps
            skip_nonfinite(state, args, optimizer, out, writer)
            continue
        state.nonfinite_in_a_row = 0
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip) if args.grad_clip > 0 else None
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        step_time = time.perf_counter() - tick
        tick = time.perf_counter()
        samples_per_s = args.batch_size / step_time
        if env.is_main:
            bar.set_postfix(loss=f"{out.parts['total'].item():.2f}", samples_s=f'{samples_per_s:.0f}')
            if writer is not None:
                for name, value in out.parts.items():
                    writer.add_scalar(f'train/loss_{name}' if name != 'total' else 'train/loss', value.item(), state.step)
                for group in optimizer.param_groups:
                    writer.add_scalar(f"train/lr_{group['name']}", group['lr'], state.step)
                if grad_norm is not None:
                    writer.add_scalar('train/grad_norm', grad_norm.item(), state.step)
                writer.add_scalar('train/step_time', step_time, state.step)
                writer.add_scalar('train/samples_per_s', samples_per_s, state.step)
            if state.step % args.log_step == 0:
                parts = ' '.join(f'{k} {v.item():.3f}' for k, v in out.parts.items())
                logger.info(f'epoch {state.epoch} step {state.step}: {parts} | {samples_per_s:.0f} samples/s')
        state.step += 1
        if state.position < n_batches and ((args.max_steps and state.step >= args.max_steps)
                                           or (after_step is not None and after_step())):
            return False
    return True


def skip_nonfinite(state, args, optimizer, out, writer):
    """Skip a step whose loss is NaN/inf; abort after --max_nonfinite in a row."""
    optimizer.zero_grad(set_to_none=True)
    state.nonfinite_in_a_row += 1
    state.nonfinite_total += 1
    parts = ', '.join(f'{k}={v.item():.4g}' for k, v in out.parts.items())
    logger.warning(f'step {state.step}: non-finite loss ({parts}); step skipped '
                   f'({state.nonfinite_in_a_row} in a row, {state.nonfinite_total} in total)')
    if writer is not None:
        writer.add_scalar('train/nonfinite_steps', state.nonfinite_total, state.step)
        writer.flush()  # rare; on disk even if the run aborts below
    if state.nonfinite_in_a_row >= args.max_nonfinite:
        raise UserError(f'the loss was not finite for {state.nonfinite_in_a_row} steps in a row (at step '
                        f'{state.step}); training stopped. Check the features for NaN/inf, lower --learning_rate, '
                        'or use --precision fp32; the last checkpoint is intact')


def validate(model, split, args, env, step=None, writer=None, prefix='val'):
    """Rank a split with the field's protocol; log and return its results (rank 0 only)."""
    sims = split_sims(unwrap(model), split, env.device, args.eval_batch_size, args.precision)
    results = evaluate_sims(sims)
    for r in results:
        logger.info(format_result(r))
    if writer is not None and step is not None:
        r = results[0]
        for side in ('i2t', 't2i'):
            for k in [f'r{k}' for k in RECALL_AT] + ['medr', 'meanr']:
                writer.add_scalar(f'{prefix}/{side}_{k}', r[side][k], step)
        writer.add_scalar(f'{prefix}/rsum', r['rsum'], step)
    return results, sims

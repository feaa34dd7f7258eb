"""A training run from start to finish: the Trainer owns the model, optimizer, scheduler, scaler,
sampler, loader, writer and the checkpoint policy; fit() runs the epochs and says why it stopped.

train.py is the driver: options, data, model, then Trainer(...).fit() and the final test.
"""
import enum
import logging
import math
import os
import random
import time

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import arguments
from lib import checkpoint as ckpt_lib
from lib import run_folder
from lib.distributed import all_gather_objects, all_max, barrier, wrap_ddp
from lib.engine import train_one_epoch, unwrap, validate
from lib.loader import make_loader
from lib.errors import UserError
from lib.metrics import evaluate_sims, format_result
from lib.sims_file import save_sims
from lib.optim import build_optimizer
from lib.precision import grad_scaler
from lib.resume import CheckpointSchedule, StopSignals, rng_state

logger = logging.getLogger('hrem')


class Stop(enum.Enum):
    """Why fit() returned."""
    FINISHED = 'finished'      # every epoch trained
    MAX_STEPS = 'max_steps'    # --max_steps reached (checkpoint_last.pth holds the position)
    SIGNAL = 'signal'          # SIGTERM/SIGINT (checkpoint_last.pth holds the position)


class TrainState:
    """Counters that a checkpoint must restore for an exact resume. Only the Trainer and the
    epoch loop it calls (lib.engine.train_one_epoch) change them."""

    def __init__(self, epoch=0, step=0, best_rsum=-math.inf, nonfinite_in_a_row=0, nonfinite_total=0):
        self.epoch, self.step, self.best_rsum = epoch, step, best_rsum
        self.position = 0  # batches taken from the current epoch (optimizer steps and skipped ones)
        self.nonfinite_in_a_row = nonfinite_in_a_row
        self.nonfinite_total = nonfinite_total

    def counters(self):
        return {'nonfinite_in_a_row': self.nonfinite_in_a_row, 'nonfinite_total': self.nonfinite_total}


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def resume_advice(folder):
    """What to do after a failed save: continue from checkpoint_last.pth when there is one."""
    last = os.path.join(folder, run_folder.LAST)
    return f'continue with --resume {last} once the cause is fixed' if os.path.isfile(last) else None


def save_last_checkpoint(model, args, env, state, optimizer, scheduler, scaler, writer, mid_epoch):
    """Write checkpoint_last.pth at an epoch's end (rank 0 calls it) or, with the position and
    every rank's random state, after state.position batches of an epoch (every rank calls it).
    Returns the checkpoint on rank 0."""
    position = None
    if mid_epoch:
        position = {'batches': state.position, 'world_size': env.world_size,
                    'rng': all_gather_objects(rng_state(env.device), env)}
    if env.is_main:
        if writer is not None:
            writer.flush()  # the events up to this step reach the disk before a checkpoint that keeps them
        ckpt = ckpt_lib.make_checkpoint(model, args, state.epoch if mid_epoch else state.epoch + 1, state.step,
                                        state.best_rsum, optimizer, scheduler, scaler, state.counters(), position)
        ckpt_lib.save_atomic(ckpt, os.path.join(args.logger_name, run_folder.LAST), resume_advice(args.logger_name))
        return ckpt


class Trainer:
    """One run's training. `resume_ckpt`: a checkpoint_last.pth read by lib.checkpoint to continue
    exactly (optimizer, schedule, counters and position restored)."""

    def __init__(self, model, args, env, train_split, val_split, resume_ckpt=None):
        self.model, self.args, self.env, self.val_split = model, args, env, val_split
        self.optimizer, self.scheduler = build_optimizer(model, args)
        self.scaler = grad_scaler(env.device, args.precision)
        self.state = TrainState()
        if resume_ckpt is not None:
            self.optimizer.load_state_dict(resume_ckpt['optimizer'])
            self.scheduler.load_state_dict(resume_ckpt['scheduler'])
            if resume_ckpt.get('scaler'):
                self.scaler.load_state_dict(resume_ckpt['scaler'])
            self.state = TrainState(resume_ckpt['epoch'], resume_ckpt['iteration'], resume_ckpt['best_rsum'],
                                    **resume_ckpt.get('counters', {}))
        self.train_model, self.gather = model, None
        if env.distributed:
            self.train_model, self.gather = wrap_ddp(model, env, args.seed)
        self.loader, self.dataset, self.sampler = make_loader(train_split, args, env)
        self.n_batches = len(self.loader)
        self.start, self.rng = (resume_position(resume_ckpt, env, self.n_batches, args.resume)
                                if resume_ckpt is not None else (0, None))
        if resume_ckpt is not None:
            logger.info(f'resumed from {args.resume}: epoch {self.state.epoch}, step {self.state.step}, '
                        f'batch {self.start} of the epoch')
        # purge_step drops events a killed run logged after its last checkpoint
        self.writer = (SummaryWriter(args.logger_name, purge_step=self.state.step if resume_ckpt else None)
                       if env.is_main else None)
        self.schedule = CheckpointSchedule(args.checkpoint_every, args.checkpoint_minutes)
        self.mid_epoch = False  # True when fit() stopped inside an epoch
        self.signum = 0

    def save_last_checkpoint(self, mid_epoch):
        return save_last_checkpoint(self.model, self.args, self.env, self.state, self.optimizer, self.scheduler,
                                    self.scaler, self.writer, mid_epoch)

    def _after_step(self, stop):
        """Mid-epoch, after each step: a checkpoint when one is due; True when a signal asks every
        rank to stop (every rank takes the same decision)."""
        self.signum, due = all_max([stop.signum, int(self.schedule.due(self.state.step))], self.env)
        if due and not self.signum:  # a stop writes its own checkpoint
            self.save_last_checkpoint(True)
            self.schedule.saved()
        return bool(self.signum)

    def fit(self):
        """Train to --num_epochs (or --max_steps, or a stop signal); validate and checkpoint at each
        epoch's end, model_best.pth when the validation rsum improves. Returns a Stop."""
        args, env, state = self.args, self.env, self.state
        with StopSignals() as stop:
            for epoch in range(state.epoch, args.num_epochs):
                state.epoch, state.position = epoch, self.start
                if args.max_steps and state.step >= args.max_steps:
                    self.mid_epoch = self.start > 0  # checkpoint_last.pth already holds this position
                    return Stop.MAX_STEPS
                # every random choice of an epoch derives from (seed, rank, epoch): resuming repeats it
                seed_all(args.seed + 1000 * epoch + env.rank)
                self.sampler.set_epoch(epoch)
                self.sampler.start = self.start * self.loader.batch_size  # a mid-epoch resume skips the batches taken
                self.dataset.set_epoch(epoch)
                finished = train_one_epoch(self.train_model, self.loader, self.optimizer, self.scaler, state, args,
                                           env, self.writer, self.gather, lambda: self._after_step(stop), self.rng)
                self.start, self.rng = 0, None
                if not finished:  # stopped by --max_steps or a signal: validation stays at epochs' ends
                    self.mid_epoch = True
                    self.save_last_checkpoint(True)
                    return Stop.SIGNAL if self.signum else Stop.MAX_STEPS
                self.scheduler.step()
                if env.is_main:
                    self._end_of_epoch(epoch)
                self.schedule.saved()
                barrier(env)
                self.signum = all_max([stop.signum], env)[0]  # a signal during validation stops before the next epoch
                if self.signum:
                    return Stop.SIGNAL
        if args.max_steps and state.step >= args.max_steps:
            return Stop.MAX_STEPS
        return Stop.FINISHED

    def _end_of_epoch(self, epoch):
        """Validate (logged at the epoch's last step: a resumed run purges events from state.step
        on), write checkpoint_last.pth and, when the rsum improved, model_best.pth."""
        state, folder = self.state, self.args.logger_name
        results, _ = validate(self.model, self.val_split, self.args, self.env, state.step - 1, self.writer)
        rsum = results[0]['rsum']
        is_best = rsum > state.best_rsum or not math.isfinite(state.best_rsum)
        state.best_rsum = max(rsum, state.best_rsum)
        logger.info(f'epoch {epoch}: {self.args.val_split} rsum {rsum:.1f} (best {state.best_rsum:.1f})')
        ckpt = self.save_last_checkpoint(False)
        if is_best:
            ckpt_lib.save_atomic(ckpt, os.path.join(folder, run_folder.BEST), resume_advice(folder))

    def evaluate_best(self, split, started):
        """Evaluate model_best.pth on the dataset's test protocol; write results.json and sims.
        A run stopped inside its first epoch has no model_best.pth: its current weights (those of
        checkpoint_last.pth) are evaluated instead. `started`: time.time() when this process began
        (a resumed run counts from its resume)."""
        args, env, state, writer = self.args, self.env, self.state, self.writer
        folder = args.logger_name
        best_path = os.path.join(folder, run_folder.BEST)
        if self.mid_epoch and not os.path.isfile(best_path):
            name, epoch, step = run_folder.LAST, state.epoch, state.step
        else:
            best = ckpt_lib.read_checkpoint(best_path)
            ckpt_lib.load_model_weights(unwrap(self.model), best, best_path)
            name, epoch, step = run_folder.BEST, best['epoch'], best['iteration']
        split_name = arguments.test_split_of(args.dataset)
        logger.info(f'evaluating {name} (epoch {epoch}, step {step}) on {split_name}')
        _, sims = validate(self.model, split, args, env)
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
            at = state.step if self.mid_epoch else step
            writer.add_scalar('test/rsum', results[0]['rsum'], at)
            for key, sides in (extended or {}).items():
                for side, value in sides.items():
                    writer.add_scalar(f'test/{key}_{side}', value, at)
        return results

    def close(self):
        if self.writer is not None:
            self.writer.close()


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

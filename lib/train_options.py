"""Options of a training run: the command line, a --config file, and what --resume keeps."""
import argparse
import os

import arguments
from lib import checkpoint as ckpt_lib
from lib.compile import check_compile
from lib.errors import UserError
from lib.precision import check_precision, set_tf32

# Options a resumed run may change; everything else is taken from the checkpoint.
RESUME_OVERRIDES = ('device', 'workers', 'resume', 'max_steps', 'num_epochs', 'log_step', 'eval_batch_size',
                    'data_path', 'bert_path', 'max_nonfinite', 'checkpoint_every', 'checkpoint_minutes', 'compile',
                    'grad_checkpointing', 'tf32', 'cache_dir')


def resolve_args(argv):
    args = arguments.parse_train_args(argv)
    if args.resume and args.init_from:
        raise UserError('--resume continues a run, --init_from starts a new one from weights: give one of them')
    if args.resume and args.config:
        raise UserError(f'--resume continues a run with its own options; --config {args.config} starts a new run '
                        'from a file: give one of them')
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
                         if k not in RESUME_OVERRIDES and k in saved['options'] and v != saved['options'][k])
        if changed:
            raise UserError(f'--resume continues the run with its own options; --{changed[0]} cannot change '
                            f'(the run used {saved["options"][changed[0]]!r}). Options a resumed run may change: '
                            + ', '.join(f'--{k}' for k in RESUME_OVERRIDES))
        merged = {**vars(args), **saved['options'], **{k: explicit[k] for k in RESUME_OVERRIDES if k in explicit}}
        merged['logger_name'] = os.path.dirname(os.path.abspath(args.resume))
        merged['init_from'] = None  # the run's weights now come from --resume
        merged['max_steps'] = args.max_steps  # a limit of one invocation: a resume without it runs to the end
        args = argparse.Namespace(**merged)
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

"""Train a model (HREM by default). `python train.py` trains the built-in demo; see docs/training.md
for Flickr30K and COCO.

Single process (CPU or one GPU) or `torchrun --nproc_per_node N train.py ...`.
"""
import logging
import os
import signal
import time

import arguments
from lib import checkpoint as ckpt_lib
from lib import run_folder
from lib.compile import compile_encoders
from lib.data import PrecompSplit, check_feature_sizes
from lib.demo_data import ensure_demo
from lib.distributed import barrier, cleanup, init_distributed
from lib.errors import UserError, exit_on_user_error
from lib.models import config_from_args, create_model
from lib.precision import bf16_warning
from lib.text_model import enable_grad_checkpointing, load_text_backbone, load_tokenizer
from lib.token_cache import resolve_cache_dir
from lib.train_options import check_args, resolve_args
from lib.training import Stop, Trainer, seed_all

logger = logging.getLogger('hrem')


def check_init_checkpoint(init, source, split, embed_size):
    arch = ckpt_lib.architecture(init)
    if arch['img_dim'] != split.feature_size:
        raise UserError(f'{source} expects {arch["img_dim"]}-d region features; {split.ims_path} has '
                        f'{split.feature_size}')
    if arch['embed_size'] != embed_size:
        raise UserError(f'{source} has embedding size {arch["embed_size"]}, this run --embed_size '
                        f'{embed_size}; pass --embed_size {arch["embed_size"]}')


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
        check_init_checkpoint(init, source, train_split, args.embed_size)

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

    config = config_from_args(args, train_split.feature_size)
    bert = load_text_backbone(args.bert_path, pretrained=init is None)
    seed_all(args.seed)  # the initial weights depend on the seed only
    model = create_model(config, bert)
    if init is not None:
        ckpt_lib.load_model_weights(model, init, source, relation=resume_ckpt is not None)
        for key, saved, now in ckpt_lib.config_differences(init, config):
            logger.warning(f'{source} was trained with --{key} {saved}; this run uses {now}')
    model.to(env.device)
    if args.grad_checkpointing:  # before compile and DDP wrap the modules
        enable_grad_checkpointing(model)
    if args.compile:
        compile_encoders(model)
    trainer = Trainer(model, args, env, train_split, val_split, resume_ckpt)
    logger.info(f'{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters; '
                f'{trainer.n_batches} steps per epoch; {model.start_note()}')

    stop = trainer.fit()
    state = trainer.state
    where = f'step {state.step} (epoch {state.epoch}, batch {state.position} of {trainer.n_batches})'
    resume_cmd = f'--resume {os.path.join(folder, run_folder.LAST)}'
    if stop is Stop.SIGNAL:
        logger.warning(f'stopped by {signal.Signals(trainer.signum).name} at {where}; checkpoint_last.pth holds it. '
                       f'Continue with the same command line (and launcher) given only {resume_cmd}')
        trainer.close()
        cleanup(env)
        raise SystemExit(128 + trainer.signum)  # the shell's status for "ended by this signal"
    if stop is Stop.MAX_STEPS:
        logger.info(f'stopped after --max_steps {args.max_steps} at {where}; continue with {resume_cmd} '
                    'and a larger --max_steps (or none)')
    if env.is_main:
        results = trainer.evaluate_best(test_split, started)
        trainer.close()
        logger.info(f'done: test rsum {results[0]["rsum"]:.1f}; results in {os.path.join(folder, run_folder.RESULTS)}')
    barrier(env)
    cleanup(env)


if __name__ == '__main__':
    main()

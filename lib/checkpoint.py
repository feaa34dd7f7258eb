"""Checkpoints: atomic writes, safe reads, and the mapping to and from the authors' format.

Ours:     {'format': 'hrem-ckpt/2', 'model': {'img_enc', 'txt_enc', 'relation'}, 'config': dict (the
           model's configuration, lib.models), 'options': dict (the run's options without those
           that only mean something on the machine that ran it: run folder, device, workers...),
           'epoch', 'iteration', 'best_rsum', 'optimizer', 'scheduler', 'scaler', 'counters', 'position'}
          'hrem-ckpt/1' (before the config existed) held every option as 'args' and no 'config';
          read_checkpoint turns it into the current layout (and 'gnn.*' relation keys into
          'transformer.*').
          'epoch' counts finished epochs, 'iteration' optimizer steps. 'counters' (non-finite steps)
          and 'position' are optional (older checkpoints lack them): 'position' is None at an
          epoch's end, inside one {'batches': taken from the epoch 'epoch', 'world_size',
          'rng': one random state per rank (lib.resume.rng_state)}.
Authors': {'model': [image_state, text_state], 'opt': argparse.Namespace, 'epoch': int,
           'best_rsum': float, 'Eiters': int} (no relation module).

Every read uses torch.load(weights_only=True) with argparse.Namespace as the only allowed class
beyond tensors and plain containers: no code inside a checkpoint ever runs.
"""
import argparse
import dataclasses
import os
import pickle
import re

import torch

from lib.errors import UserError
from lib.writing import atomic_write

FORMAT = 'hrem-ckpt/2'
OLD_FORMATS = ('hrem-ckpt/1',)
# Options that describe the machine or invocation of a run, not the run: never saved in a checkpoint.
RUN_LOCAL_OPTIONS = ('logger_name', 'device', 'resume', 'init_from', 'overwrite', 'workers', 'cache_dir', 'config')
# Some transformers versions register this buffer in the state dict, others do not.
VERSION_DEPENDENT_KEYS = {'bert.embeddings.position_ids'}
# The only class beyond tensors and plain containers that either format needs (the authors' opt).
SAFE_GLOBALS = [argparse.Namespace]
# The authors' code (VSEModel, evalrank, the loaders) reads these from opt; ours lacks them, so a
# converted checkpoint gets their defaults (img_dim is read off the weights).
AUTHORS_OPT_DEFAULTS = {'no_imgnorm': False, 'no_txtnorm': False, 'multi_gpu': 0, 'mask_repeat': 1,
                        'save_results': 1, 'gpu_id': 0, 'val_step': 500, 'norm_input': 1, 'cross_loss': 1,
                        'workers': 2}  # workers: machine-local, not kept in our checkpoints


def save_atomic(obj, path, advice=None):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a crash mid-write leaves the previous file intact, a failed write (full disk, ...) raises a
    UserError naming the file and the cause (lib.writing)."""
    with atomic_write(path, 'wb', what='checkpoint', advice=advice) as f:
        torch.save(obj, f)


def read_raw(path):
    if not os.path.isfile(path):
        raise UserError(f'checkpoint {path} does not exist')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        # torch's message leads with advice to disable weights_only; name only the refused class
        refused = re.search(r'GLOBAL (\S+)', str(err))
        if isinstance(err, pickle.UnpicklingError) and refused:
            raise UserError(f'refusing to load {path}: it references {refused.group(1)}, but a checkpoint may only '
                            'hold tensors, numbers, strings, containers and argparse.Namespace. Nothing from it '
                            'was run; if you made it yourself, save plain state dicts instead') from err
        detail = str(err).split('WeightsUnpickler error:')[-1].strip().splitlines()
        raise UserError(f'{path} is not a readable checkpoint (truncated or not a .pth file: '
                        f'{detail[0] if detail else type(err).__name__}); use another checkpoint, e.g. '
                        'checkpoint_last.pth or model_best.pth of the run') from err


def is_authors_format(ckpt):
    return isinstance(ckpt, dict) and isinstance(ckpt.get('model'), (list, tuple)) and 'opt' in ckpt


def from_authors(ckpt):
    """The authors' dict -> ours (no relation module, no optimizer state). Their state keys are
    ours (the encoders mirror their module names); their opt is kept whole as our options and
    maps into the config (every field their opt has, the rest at our defaults)."""
    if len(ckpt['model']) != 2:
        raise UserError(f"an authors' checkpoint holds [image_state, text_state]; this one holds "
                        f"{len(ckpt['model'])} states")
    img_state, txt_state = ckpt['model']
    opt = ckpt.get('opt')
    args = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else {}
    # which model's authors wrote it (their module names tell), in our names (lib.models.authors_model)
    from lib.models import authors_model
    name, parts = authors_model({'img_enc': dict(img_state), 'txt_enc': dict(txt_state)})
    if name != 'hrem':
        args['model'] = name
    return {'format': FORMAT, 'model': {**parts, 'relation': None},
            'options': args, 'config': None, 'epoch': int(ckpt.get('epoch', 0)), 'iteration': int(ckpt.get('Eiters', 0)),
            'best_rsum': float(ckpt.get('best_rsum', 0.0)), 'optimizer': None, 'scheduler': None, 'scaler': None}


def to_authors(ckpt):
    """Ours -> the authors' dict, loadable by their code: our options over their defaults in opt.
    The relation module and optimizer state are dropped (their format has no place for them)."""
    opt = {**AUTHORS_OPT_DEFAULTS, 'img_dim': architecture(ckpt)['img_dim'], **ckpt['options']}
    return {'model': [dict(ckpt['model']['img_enc']), dict(ckpt['model']['txt_enc'])],
            'opt': argparse.Namespace(**opt), 'epoch': int(ckpt['epoch']),
            'best_rsum': float(ckpt['best_rsum']), 'Eiters': int(ckpt['iteration'])}


def from_old_format(ckpt):
    """'hrem-ckpt/1' -> the current layout: options without the run-local ones, the config built
    from them, the relation Transformer's keys under their new name."""
    new = {k: v for k, v in ckpt.items() if k != 'args'}
    new['format'], new['options'], new['config'] = FORMAT, dict(ckpt['args']), None
    relation = ckpt['model'].get('relation')
    if relation is not None:
        new['model'] = {**ckpt['model'], 'relation': {
            ('transformer.' + k[len('gnn.'):] if k.startswith('gnn.') else k): v for k, v in relation.items()}}
    return new


def read_checkpoint(path):
    """Read ours (any version) or the authors' checkpoint, returned in the current layout with
    'config' a dict of the model's configuration."""
    ckpt = read_raw(path)
    if is_authors_format(ckpt):
        ckpt = from_authors(ckpt)
    elif isinstance(ckpt, dict) and ckpt.get('format') in OLD_FORMATS:
        ckpt = from_old_format(ckpt)
    elif not (isinstance(ckpt, dict) and ckpt.get('format') == FORMAT):
        raise UserError(f'{path} is not an HREM checkpoint (neither this project\'s format nor the authors\'); '
                        'pass a model_best.pth or checkpoint_last.pth')
    for part in ('img_enc', 'txt_enc'):
        if not isinstance(ckpt['model'].get(part), dict) or not ckpt['model'][part]:
            raise UserError(f'{path} has no {part} weights')
    if ckpt.get('config') is None:  # the authors' and older checkpoints: from their options and weights
        from lib.models import config_from_dict
        config = config_from_dict({**ckpt['options'], **architecture(ckpt)})
        ckpt['config'] = dataclasses.asdict(config)
    return ckpt


def architecture(ckpt):
    """Sizes read off the weights themselves: image feature size, embedding size, text hidden size."""
    img, txt = ckpt['model']['img_enc'], ckpt['model']['txt_enc']
    try:
        embed_size, img_dim = img['fc.fc.weight'].shape
        hidden = txt['linear.weight'].shape[1]
    except KeyError as err:
        raise UserError(f'checkpoint lacks {err.args[0]}: it is not an HREM model') from err
    return {'img_dim': int(img_dim), 'embed_size': int(embed_size), 'text_hidden': int(hidden)}


def config_differences(ckpt, config):
    """(field, checkpoint value, this run's value) for every field of the model configuration that
    differs (img_dim and the text model's path aside): a difference that changes no weight shape
    (heads, residual weight, ...) would otherwise load silently."""
    now = dataclasses.asdict(config)
    return [(k, v, now[k]) for k, v in ckpt['config'].items()
            if k in now and k not in ('img_dim', 'bert_path') and v != now[k]]


def load_module_state(module, state, name, source):
    """load_state_dict with one clear error for missing/unexpected keys or shape mismatches;
    tolerates exactly the version-dependent position_ids buffer."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state) - VERSION_DEPENDENT_KEYS)
    unexpected = sorted(set(state) - set(own) - VERSION_DEPENDENT_KEYS)
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in sorted(set(own) & set(state))
                  if tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f'{what} keys {keys[:5]}' + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else '')
                for what, keys in (('missing', missing), ('unexpected', unexpected)) if keys]
    problems += [f'{k}: checkpoint {a} vs model {b}' for k, a, b in mismatched[:5]]
    if problems:
        raise UserError(f'{source}: {name} weights do not fit this model: ' + '; '.join(problems)
                        + '. Is the checkpoint of another architecture (embedding size, text model)? '
                          'Pass the matching --bert_path / options')
    filtered = {k: v for k, v in state.items() if k in own}
    for k in VERSION_DEPENDENT_KEYS & set(own) - set(state):
        filtered[k] = own[k]
    module.load_state_dict(filtered, strict=True)


def load_model_weights(model, ckpt, source, relation=True):
    load_module_state(model.img_enc, ckpt['model']['img_enc'], 'image encoder', source)
    load_module_state(model.txt_enc, ckpt['model']['txt_enc'], 'text encoder', source)
    if relation and model.relation is not None and ckpt['model'].get('relation') is not None:
        load_module_state(model.relation, ckpt['model']['relation'], 'relation module', source)


def run_options(args):
    """The options a checkpoint keeps: all but the run-local ones."""
    return {k: v for k, v in vars(args).items() if k not in RUN_LOCAL_OPTIONS}


def make_checkpoint(model, args, epoch, iteration, best_rsum, optimizer=None, scheduler=None, scaler=None,
                    counters=None, position=None):
    def cpu(state):
        return {k: v.detach().cpu() for k, v in state.items()}
    return {'format': FORMAT,
            'model': {'img_enc': cpu(model.img_enc.state_dict()), 'txt_enc': cpu(model.txt_enc.state_dict()),
                      'relation': None if model.relation is None else cpu(model.relation.state_dict())},
            'config': dataclasses.asdict(model.config), 'options': run_options(args), 'epoch': epoch, 'iteration': iteration, 'best_rsum': best_rsum,
            'optimizer': optimizer.state_dict() if optimizer else None,
            'scheduler': scheduler.state_dict() if scheduler else None,
            'scaler': scaler.state_dict() if scaler and scaler.is_enabled() else None,
            'counters': counters or {}, 'position': position}

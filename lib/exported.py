"""Exported weights: a folder that any tool reads without unpickling anything.

    <folder>/model.safetensors   every weight, named '<part>.<key>' (part: img_enc, txt_enc, relation)
    <folder>/config.json         {'format': 'hrem-export/1', 'config': the model's configuration,
                                  'options': the training run's options, 'epoch', 'iteration', 'best_rsum'}
    <folder>/text_model/         the text model's config.json and vocabulary (no weights: they are
                                  in model.safetensors), so the folder needs no other file

Written by `tools/convert_checkpoint.py SRC DST --to safetensors`, read by lib.models.load_model.
"""
import json
import os
import shutil
import tempfile

from lib.errors import UserError

FORMAT = 'hrem-export/1'
PARTS = ('img_enc', 'txt_enc', 'relation')


def write_exported(ckpt, folder, text_model_path):
    """Write the folder next to its final place and rename it there: an interrupted export leaves
    no half-written folder behind."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer
    if os.path.exists(folder):
        raise UserError(f'{folder} already exists; remove it or export to another folder')
    parent = os.path.dirname(os.path.abspath(folder))
    tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
    try:
        tensors = {f'{part}.{k}': v.contiguous() for part in PARTS
                   for k, v in (ckpt['model'].get(part) or {}).items()}
        save_file(tensors, os.path.join(tmp, 'model.safetensors'))
        options = {k: v for k, v in ckpt['options'].items() if _is_json(v)}
        meta = {'format': FORMAT, 'config': ckpt['config'], 'options': options,
                **{k: ckpt.get(k) for k in ('epoch', 'iteration', 'best_rsum')}}
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(meta, f, indent=1)
        text = os.path.join(tmp, 'text_model')
        AutoConfig.from_pretrained(text_model_path).save_pretrained(text)
        AutoTokenizer.from_pretrained(text_model_path).save_pretrained(text)
        os.rename(tmp, folder)
    except OSError as err:
        raise UserError(f'could not write {folder}: {err.strerror or err}; free space or choose another folder') from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_json(value):
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def read_exported(folder):
    """An exported folder -> the layout of lib.checkpoint.read_checkpoint (no optimizer state)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    meta_path, weights_path = os.path.join(folder, 'config.json'), os.path.join(folder, 'model.safetensors')
    for path in (meta_path, weights_path):
        if not os.path.isfile(path):
            raise UserError(f'{folder} is not an exported model: {os.path.basename(path)} is missing '
                            '(export one with tools/convert_checkpoint.py SRC DST --to safetensors)')
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tensors = load_file(weights_path)
    except (ValueError, OSError, SafetensorError) as err:
        raise UserError(f'{folder} holds an unreadable export ({err}); export it again') from err
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise UserError(f'{meta_path} is not an HREM export config ({FORMAT}); export the model again')
    model = {part: {} for part in PARTS}
    for name, tensor in tensors.items():
        part, _, key = name.partition('.')
        if part not in model:
            raise UserError(f'{weights_path} holds {name!r}, which belongs to no part of the model; export it again')
        model[part][key] = tensor
    model['relation'] = model['relation'] or None
    return {'format': FORMAT, 'model': model, 'config': meta['config'], 'options': meta.get('options', {}),
            'epoch': meta.get('epoch'), 'iteration': meta.get('iteration'), 'best_rsum': meta.get('best_rsum'),
            'optimizer': None, 'scheduler': None, 'scaler': None}

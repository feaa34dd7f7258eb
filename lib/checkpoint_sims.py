"""Similarities of trained models on a split: what eval.py, --compare and the retrieval report
compute from checkpoints."""
import os
import sys

import numpy as np

from arguments import test_split_of
from lib.data import PrecompSplit
from lib.distributed import pick_device
from lib.errors import UserError
from lib.evaluation import check_fold5, split_sims
from lib.models import load_model
from lib.precision import bf16_warning, set_tf32
from lib.token_cache import resolve_cache_dir


def checkpoint_sims(paths, device=None, data_path=None, dataset=None, split=None, bert_path=None, batch_size=128,
                    precision='fp32', tf32=False, cache_dir=None, fold5=False, eccv=False):
    """(similarities, (precomp folder, split name) of the first model's split) of the models in
    `paths` (checkpoints or exported folders), averaged when there are several. data_path,
    dataset, split, bert_path: when None, each model's own (split: its dataset's test split)."""
    device = pick_device(device)
    set_tf32(device, tf32)
    if bf16_warning(device, precision):
        print(f'warning: {bf16_warning(device, precision)}', file=sys.stderr)
    all_sims, splits, first = [], {}, None
    for path in paths:
        model, config, tokenizer, options = load_model(path, device, bert_path)
        data_path_, dataset_ = data_path or options['data_path'], dataset or options['dataset']
        split_name = split or test_split_of(dataset_)
        key = (data_path_, dataset_, split_name, config.bert_path)
        if key not in splits:  # captions are tokenised once per text model
            splits[key] = PrecompSplit(data_path_, dataset_, split_name, tokenizer, show_progress=True,
                                       cache_dir=resolve_cache_dir(cache_dir))
            if fold5:  # before any encoding
                check_fold5(splits[key].n_images, splits[key].ims_path)
            if eccv:  # before any encoding too
                check_eccv_split(splits[key], split_name)
            splits[key].check_finite()
            if splits[key].cache_note:  # after the checks, so that a refusal stays one line
                print(splits[key].cache_note, file=sys.stderr)
        data = splits[key]
        first = first or (os.path.dirname(data.ims_path), split_name)
        if data.feature_size != model.img_dim:
            raise UserError(f'{path} expects {model.img_dim}-d region features; {data.ims_path} has '
                            f'{data.feature_size}')
        print(f'{path}: {dataset_}/{split_name}, {data.n_images} images, {len(data.captions)} captions', file=sys.stderr)
        all_sims.append(split_sims(model, data, device, batch_size, precision))
    shapes = {s.shape for s in all_sims}
    if len(shapes) > 1:
        raise UserError(f'the checkpoints were evaluated on splits of different sizes {sorted(shapes)}')
    return (np.mean(all_sims, axis=0) if len(all_sims) > 1 else all_sims[0]), first


def check_eccv_split(split, split_name):
    """--eccv on a checkpoint: the split must be COCO 5K, and its ids files (where present) in the
    package's order."""
    from lib.extended_metrics import N_CAPTIONS, N_IMAGES, check_split_ids
    if (split.n_images, len(split.captions)) != (N_IMAGES, N_CAPTIONS):
        raise UserError(f'--eccv needs the COCO 5K test split (5000 images, 25000 captions); {split.ims_path} has '
                        f'{split.n_images} images and {len(split.captions)} captions. Pass --split testall')
    check_split_ids(os.path.dirname(split.ims_path), split_name)

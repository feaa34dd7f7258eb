"""Evaluate checkpoints (ours or the authors'), ensembles, or saved similarity matrices.

  python eval.py --checkpoint runs/f30k/model_best.pth
  python eval.py --checkpoint runs/coco/model_best.pth --fold5
  python eval.py --checkpoint A.pth B.pth --save_sims ens.npy --json ens.json   # ensemble
  python eval.py --sims results_f30k.npy other.npy                              # no model needed
"""
import argparse
import json
import logging
import sys

import numpy as np

import arguments
from lib.data import PrecompSplit
from lib.distributed import pick_device
from lib.errors import UserError, exit_on_user_error
from lib.evaluation import check_fold5, evaluate_sims, format_result, load_sims, save_sims, split_sims
from lib.inference import load_for_inference
from lib.precision import bf16_warning, set_tf32
from lib.token_cache import resolve_cache_dir
from lib.writing import atomic_write


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', nargs='+', help='one or more .pth (several: similarities averaged)')
    src.add_argument('--sims', nargs='+', help="saved similarity files (the authors' results_*.npy format)")
    p.add_argument('--data_path', help='folder that holds <dataset>_precomp/; when not given: the (first) checkpoint\'s')
    p.add_argument('--dataset', help="dataset name; when not given: the checkpoint's")
    p.add_argument('--split', help='split to evaluate; when not given: test (testall for coco)')
    p.add_argument('--bert_path', help="text model folder for config and vocabulary; when not given: the checkpoint's")
    p.add_argument('--fold5', action='store_true', help='COCO 1K: also the five 1000-image folds and their mean')
    p.add_argument('--save_sims', help="write the (averaged) similarities to this file, in the authors' results format")
    p.add_argument('--json', help='write the results as JSON to this file')
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu; when not given: cuda when present, else cpu')
    p.add_argument('--batch_size', type=int, default=128, help='encoding batch size')
    p.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'],
                   help='autocast precision of the encoders; ranking stays in fp32')
    arguments.add_cache_arg(p)
    p.add_argument('--tf32', action='store_true', help='CUDA only: fp32 matrix products in TF32 (docs/precision_and_speed.md)')
    return p


def checkpoint_sims(opts):
    device = pick_device(opts.device)
    set_tf32(device, opts.tf32)
    if bf16_warning(device, opts.precision):
        print(f'warning: {bf16_warning(device, opts.precision)}', file=sys.stderr)
    all_sims, splits = [], {}
    for path in opts.checkpoint:
        model, args, tokenizer = load_for_inference(path, device, opts.bert_path)
        data_path = opts.data_path or args.data_path
        dataset = opts.dataset or args.dataset
        split_name = opts.split or arguments.test_split_of(dataset)
        key = (data_path, dataset, split_name, args.bert_path)
        if key not in splits:  # captions are tokenised once per text model
            splits[key] = PrecompSplit(data_path, dataset, split_name, tokenizer, show_progress=True,
                                       cache_dir=resolve_cache_dir(opts.cache_dir))
            if splits[key].cache_note:
                print(splits[key].cache_note, file=sys.stderr)
            if opts.fold5:  # before any encoding
                check_fold5(splits[key].n_images, splits[key].ims_path)
            splits[key].check_finite()
        split = splits[key]
        if split.feature_size != model.img_dim:
            raise UserError(f'{path} expects {model.img_dim}-d region features; {split.ims_path} has '
                            f'{split.feature_size}')
        print(f'{path}: {dataset}/{split_name}, {split.n_images} images, {len(split.captions)} captions', file=sys.stderr)
        all_sims.append(split_sims(model, split, device, opts.batch_size, opts.precision))
    shapes = {s.shape for s in all_sims}
    if len(shapes) > 1:
        raise UserError(f'the checkpoints were evaluated on splits of different sizes {sorted(shapes)}')
    return np.mean(all_sims, axis=0) if len(all_sims) > 1 else all_sims[0]


@exit_on_user_error
def main(argv=None):
    opts = get_parser().parse_args(argv)
    logging.getLogger('transformers').setLevel(logging.ERROR)
    if opts.sims:
        sims = [load_sims(p) for p in opts.sims]
        if len({s.shape for s in sims}) > 1:
            raise UserError(f'the similarity files have different shapes {[s.shape for s in sims]}')
        sims = np.mean(sims, axis=0) if len(sims) > 1 else sims[0]
    else:
        sims = checkpoint_sims(opts)
    results = evaluate_sims(sims, opts.fold5)
    for r in results:
        print(format_result(r))
    if opts.save_sims:
        save_sims(opts.save_sims, sims)
    if opts.json:
        with atomic_write(opts.json, 'w') as f:
            json.dump({'results': results}, f, indent=2)
    return results


if __name__ == '__main__':
    main()

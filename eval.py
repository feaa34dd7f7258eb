"""Evaluate checkpoints (ours or the authors'), ensembles, or saved similarity matrices.

  python eval.py --checkpoint runs/f30k/model_best.pth
  python eval.py --checkpoint runs/coco/model_best.pth --fold5
  python eval.py --checkpoint A.pth B.pth --save_sims ens.npy --json ens.json   # ensemble
  python eval.py --sims results_f30k.npy other.npy                              # no model needed
  python eval.py --sims results_coco.npy --eccv                                 # + ECCV Caption, CxC
  python eval.py --compare runs/a/results_coco.npy runs/b/results_coco.npy --fold5   # B - A, intervals
"""
import argparse
import json
import logging

import numpy as np

import arguments
from lib import significance
from lib.checkpoint_sims import checkpoint_sims
from lib.errors import UserError, exit_on_user_error
from lib.evaluation import check_fold5, evaluate_sims, format_result, load_sims, save_sims
from lib.writing import atomic_write


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', nargs='+', help='one or more .pth (several: similarities averaged)')
    src.add_argument('--sims', nargs='+', help="saved similarity files (the authors' results_*.npy format)")
    src.add_argument('--compare', nargs=2, metavar=('A', 'B'),
                     help='paired comparison of two models on the same split: each a checkpoint (.pth) or a '
                          'saved similarity file; several seeds of each as comma-separated lists, paired in '
                          'order. Prints A, B, B - A, its 95%% interval and p-value: paired bootstrap and sign flips '
                          "over the images for one seed pair, Student's t over several seed pairs")
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
    p.add_argument('--eccv', action='store_true',
                   help='COCO 5K only: add ECCV Caption mAP@R, R-Precision, R@1 and CxC R@1/5/10 '
                        '(package eccv-caption)')
    p.add_argument('--ci', action='store_true',
                   help='95%% bootstrap intervals of every R@K and rsum (images with their captions resampled)')
    p.add_argument('--bootstrap', type=int, default=1000, help='resamples for --ci and --compare')
    p.add_argument('--seed', type=int, default=0, help='random seed of the resamples (--ci, --compare)')
    return p


def checkpoint_sims_of(opts, paths=None):
    """checkpoint_sims (lib/checkpoint_sims.py) with this command line's options."""
    return checkpoint_sims(paths or opts.checkpoint, opts.device, data_path=opts.data_path, dataset=opts.dataset,
                           split=opts.split, bert_path=opts.bert_path, batch_size=opts.batch_size,
                           precision=opts.precision, tf32=opts.tf32, cache_dir=opts.cache_dir, fold5=opts.fold5,
                           eccv=opts.eccv)


def load_side(opts, spec):
    """The similarity matrices of one side of --compare: comma-separated checkpoints or files."""
    out = []
    for path in [p for p in spec.split(',') if p]:
        if path.endswith(('.pth', '.pt', '.tar')):
            out.append(checkpoint_sims_of(opts, [path])[0])
        else:
            out.append(load_sims(path))
    if not out:
        raise UserError(f'--compare {spec!r}: no checkpoint or similarity file given')
    return out


def run_compare(opts):
    if opts.bootstrap < 1:
        raise UserError(f'--bootstrap {opts.bootstrap}: give at least 1 resample (1000 is usual)')
    a, b = (load_side(opts, spec) for spec in opts.compare)
    if opts.fold5:
        check_fold5(a[0].shape[0], opts.compare[0])
    result = significance.compare(a, b, opts.bootstrap, opts.seed, opts.fold5)
    print(f"A = {opts.compare[0]}\nB = {opts.compare[1]}\n"
          f"{'COCO 1K (mean of 5 folds)' if opts.fold5 else 'whole split'}, {a[0].shape[0]} images")
    print(significance.format_compare(result))
    if opts.json:
        with open(opts.json, 'w') as f:
            json.dump({'compare': {'a': opts.compare[0], 'b': opts.compare[1], 'fold5': opts.fold5,
                                   'seed': opts.seed, **result}}, f, indent=2)
    return result


@exit_on_user_error
def main(argv=None):
    opts = get_parser().parse_args(argv)
    logging.getLogger('transformers').setLevel(logging.ERROR)
    if opts.compare:
        if opts.eccv or opts.ci or opts.save_sims:
            raise UserError('--compare prints its own table; run --eccv, --ci or --save_sims with --checkpoint '
                            'or --sims')
        return run_compare(opts)
    folder = None
    if opts.sims:
        sims = [load_sims(p) for p in opts.sims]
        if len({s.shape for s in sims}) > 1:
            raise UserError(f'the similarity files have different shapes {[s.shape for s in sims]}')
        sims = np.mean(sims, axis=0) if len(sims) > 1 else sims[0]
        if opts.eccv:
            from lib.extended_metrics import check_shape
            check_shape(sims, opts.sims[0])
    else:
        sims, folder = checkpoint_sims_of(opts)
    results = evaluate_sims(sims, opts.fold5)
    for r in results:
        print(format_result(r))
    doc = {'results': results}
    if opts.ci:
        if opts.bootstrap < 1:
            raise UserError(f'--bootstrap {opts.bootstrap}: give at least 1 resample (1000 is usual)')
        doc['ci'] = {'full': significance.intervals(sims, opts.bootstrap, opts.seed)}
        if opts.fold5:
            doc['ci']['1k-mean'] = significance.intervals(sims, opts.bootstrap, opts.seed, fold5=True)
        for name, ci in doc['ci'].items():
            print(significance.format_intervals(ci, name))
    if opts.eccv:
        from lib.extended_metrics import extended_metrics, format_extended
        doc['extended'] = extended_metrics(sims)
        print('ECCV Caption / CxC (eccv-caption package, COCO 5K):')
        print(format_extended(doc['extended']))
    if opts.save_sims:
        save_sims(opts.save_sims, sims)
    if opts.json:
        with atomic_write(opts.json, 'w') as f:
            json.dump(doc, f, indent=2)
    return results


if __name__ == '__main__':
    main()

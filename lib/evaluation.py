"""Compatibility re-export: the evaluation code now lives in three modules, import from those.

- lib/metrics.py: ranks, R@K / medr / meanr, the COCO 1K folds (pure functions of a matrix);
- lib/encoding.py: encoding a split's images and captions, its similarity matrix;
- lib/sims_file.py: the authors' results_<dataset>.npy format (save_sims / load_sims).
Kept for code written against the old module (other branches, notebooks); nothing in this
repository imports it (tests/test_imports.py checks).
"""
from lib.encoding import encode_captions, encode_images, split_sims  # noqa: F401
from lib.metrics import (FOLD_IMAGES, RECALL_AT, ROW_CHUNK, check_fold5, check_sims_shape, evaluate_sims,  # noqa: F401
                         format_result, i2t_ranks, rank_metrics, recall_metrics, t2i_ranks)
from lib.sims_file import load_sims, save_sims  # noqa: F401

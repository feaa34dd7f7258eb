"""Encoding for evaluation: every image and every caption of a split once (no augmentation), and
the split's similarity matrix img @ cap.T (ranked by lib/metrics.py)."""
import numpy as np
import torch

from lib.data import pad_batch
from lib.precision import autocast
from lib.progress import progress

@torch.no_grad()
def encode_images(model, images, device, batch_size=128, precision='fp32'):
    """(N, R, D) array (memory-mapped is fine) -> (N, E) float32 numpy, every region valid."""
    out = []
    for start in progress(range(0, len(images), batch_size), desc='encoding images', unit='batch'):
        block = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32)).to(device)
        lengths = torch.full((len(block),), block.shape[1], device=device)
        with autocast(device, precision):
            emb, _ = model.encode_image(block, lengths)
        out.append(emb.float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def encode_captions(model, split, device, batch_size=128, precision='fp32'):
    """Every caption of a PrecompSplit -> (M, E) float32 numpy (no augmentation)."""
    out = []
    n = len(split.tokens)
    for start in progress(range(0, n, batch_size), desc='encoding captions', unit='batch'):
        ids = [split.text.encode(*split.tokens.pieces(c)) for c in range(start, min(n, start + batch_size))]
        tokens, lengths = pad_batch(ids, np.int64)
        with autocast(device, precision):
            emb, _ = model.encode_text(tokens.to(device), lengths.to(device))
        out.append(emb.float().cpu())
    return torch.cat(out).numpy()


def split_sims(model, split, device, batch_size=128, precision='fp32'):
    """Similarity matrix (N images, M captions) of a split, each image encoded once."""
    was_training = model.training
    model.eval()
    img = encode_images(model, split.images, device, batch_size, precision)
    cap = encode_captions(model, split, device, batch_size, precision)
    model.train(was_training)
    return img @ cap.T

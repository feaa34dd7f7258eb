"""The field's retrieval protocol: encode a split once, rank by counting, report R@K / medr / meanr.

sims = img @ cap.T has shape (N, 5N), captions 5i..5i+4 belonging to image i, or (N, N) for a
split with one caption per image (caption i belongs to image i); P = 5 or 1 captions per image.
- image-to-text rank of image i: the best 0-based position among its P captions;
- text-to-image rank of caption j: the position of image j // P;
- R@K = 100 * fraction of ranks < K; medr = floor(median) + 1; meanr = mean + 1.
A rank is the number of candidates that score strictly higher than the positive, so no sort
is needed.
"""
import pickle

import numpy as np
import torch

from lib.data import npy_header, pad_batch
from lib.errors import UserError
from lib.precision import autocast
from lib.progress import progress
from lib.writing import atomic_write

RECALL_AT = (1, 5, 10)
ROW_CHUNK = 1024  # rows ranked at a time: bounds the temporary boolean matrix


def i2t_ranks(sims, per_image=5):
    s = torch.as_tensor(sims)
    n = s.shape[0]
    ranks = torch.empty(n, dtype=torch.long)
    for start in range(0, n, ROW_CHUNK):
        rows = s[start:start + ROW_CHUNK]
        idx = torch.arange(start, start + len(rows))
        own = rows.gather(1, idx[:, None] * per_image + torch.arange(per_image)[None])
        # the best of the positives is the one with the highest score
        ranks[start:start + len(rows)] = (rows > own.max(dim=1, keepdim=True).values).sum(1)
    return ranks.numpy()


def t2i_ranks(sims, per_image=5):
    s = torch.as_tensor(sims).t()
    m = s.shape[0]
    ranks = torch.empty(m, dtype=torch.long)
    for start in range(0, m, ROW_CHUNK):
        rows = s[start:start + ROW_CHUNK]
        own = rows.gather(1, (torch.arange(start, start + len(rows)) // per_image)[:, None])
        ranks[start:start + len(rows)] = (rows > own).sum(1)
    return ranks.numpy()


def recall_metrics(ranks):
    out = {f'r{k}': 100.0 * float(np.mean(ranks < k)) for k in RECALL_AT}
    out['medr'] = float(np.floor(np.median(ranks)) + 1)
    out['meanr'] = float(ranks.mean() + 1)
    return out


def check_sims_shape(sims, source='similarity matrix'):
    """Captions per image of a similarity matrix: 5 for (N, 5N), 1 for (N, N)."""
    if sims.ndim == 2 and sims.shape[0] > 0:
        for per_image in (5, 1):
            if sims.shape[1] == per_image * sims.shape[0]:
                return per_image
    raise UserError(f'{source} has shape {tuple(sims.shape)}; expected (N images, 5N captions) or, with one '
                    'caption per image, (N, N)')


def rank_metrics(sims, name='full'):
    """Metrics of one (N, 5N) or (N, N) similarity matrix."""
    per_image = check_sims_shape(sims)
    i2t = recall_metrics(i2t_ranks(sims, per_image))
    t2i = recall_metrics(t2i_ranks(sims, per_image))
    rsum = sum(i2t[f'r{k}'] + t2i[f'r{k}'] for k in RECALL_AT)
    return {'name': name, 'n_images': int(sims.shape[0]), 'n_captions': int(sims.shape[1]),
            'i2t': i2t, 't2i': t2i, 'rsum': rsum}


FOLD_IMAGES = 1000


def check_fold5(n_images, source='this matrix'):
    if n_images != 5 * FOLD_IMAGES:
        raise UserError(f'--fold5 needs the 5000-image COCO testall split; {source} has {n_images} images. '
                        'Drop --fold5 or pass --split testall')


def evaluate_sims(sims, fold5=False):
    """Results for the whole matrix and, with fold5 (COCO 1K), the five 1000-image folds and
    their mean (every metric averaged over folds, rsum included)."""
    sims = torch.as_tensor(np.asarray(sims, dtype=np.float32))
    results = [rank_metrics(sims)]
    if fold5:
        check_fold5(sims.shape[0])
        fold_caps = check_sims_shape(sims) * FOLD_IMAGES
        folds = [rank_metrics(sims[i * FOLD_IMAGES:(i + 1) * FOLD_IMAGES,
                                   i * fold_caps:(i + 1) * fold_caps], f'1k-fold{i}')
                 for i in progress(range(5), desc='ranking the 1K folds', unit='fold')]
        mean = {'name': '1k-mean', 'n_images': FOLD_IMAGES, 'n_captions': fold_caps}
        for side in ('i2t', 't2i'):
            mean[side] = {k: float(np.mean([f[side][k] for f in folds])) for k in folds[0][side]}
        mean['rsum'] = float(np.mean([f['rsum'] for f in folds]))
        results += folds + [mean]
    return results


def format_result(r):
    i, t = r['i2t'], r['t2i']
    return (f"{r['name']:>9} ({r['n_images']} images): "
            f"i2t R@1 {i['r1']:.1f} R@5 {i['r5']:.1f} R@10 {i['r10']:.1f} medr {i['medr']:.1f} meanr {i['meanr']:.1f} | "
            f"t2i R@1 {t['r1']:.1f} R@5 {t['r5']:.1f} R@10 {t['r10']:.1f} medr {t['medr']:.1f} meanr {t['meanr']:.1f} | "
            f"rsum {r['rsum']:.1f}")


# ----------------------------------------------------------------------------- encoding

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


# ----------------------------------------------------------------------------- the authors' results files

def save_sims(path, sims):
    """The authors' results_<dataset>.npy: np.save of the dict {'npts': N, 'sims': (N, 5N)} ((N, N) for
    one caption per image)."""
    sims = np.asarray(sims)
    with atomic_write(path, 'wb', what='similarities') as f:
        np.save(f, {'npts': int(sims.shape[0]), 'sims': sims}, allow_pickle=True)


class _ResultsUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; any other class is refused, so no code in
    the file can run."""
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
               ('numpy', 'ndarray'), ('numpy', 'dtype')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}')
        return super().find_class(module, name)


def load_sims(path):
    """Read a results file written by the authors' code or by save_sims, without unpickling
    anything but numbers and numeric arrays. Plain .npy float matrices are accepted too."""
    try:
        with open(path, 'rb') as f:
            _, dtype = npy_header(f)
            if dtype.hasobject:
                obj = _ResultsUnpickler(f).load()
            else:
                f.seek(0)
                obj = np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f'similarity file {path} does not exist')
    except (pickle.UnpicklingError, ValueError, EOFError, OSError, AttributeError, TypeError) as err:
        raise UserError(f'{path} is not a similarity file this project can read safely ({err}); expected '
                        "np.save of {'npts': N, 'sims': float array (N, 5N) or (N, N)} or a plain such .npy") from err
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if isinstance(obj, dict):
        if set(obj) != {'npts', 'sims'} or not isinstance(obj['sims'], np.ndarray):
            raise UserError(f"{path} holds a dict with keys {sorted(map(str, obj))}; expected 'npts' and 'sims'")
        sims, npts = obj['sims'], obj['npts']
        if not isinstance(npts, (int, np.integer)) or sims.ndim != 2 or int(npts) != sims.shape[0]:
            raise UserError(f"{path}: 'npts' ({npts!r}) does not match 'sims' of shape {sims.shape}")
    elif isinstance(obj, np.ndarray):
        sims = obj
    else:
        raise UserError(f'{path} holds a {type(obj).__name__}; expected a similarity matrix')
    if not np.issubdtype(sims.dtype, np.floating):
        raise UserError(f'{path}: similarities are {sims.dtype}; expected floating point')
    check_sims_shape(sims, path)
    return sims

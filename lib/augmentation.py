"""Training-time augmentation (spec section 2), vectorised over a batch.

Every random draw is a counter-based hash of (seed, epoch, caption index, stream, position): a
pure function of those numbers, so a caption gets the same augmentation whatever batch, worker or
rank reads it and whatever was drawn before (resumes repeat straight runs), and a whole batch is
drawn in a few numpy operations. The hash is splitmix64's finaliser applied to each field in turn.
"""
import numpy as np

# Word-level text augmentation: a word is perturbed with this probability, then masked / replaced
# by random tokens / deleted with these shares (every piece of the word alike).
WORD_PERTURB_PROB = 0.2
MASK_SHARE, RANDOM_SHARE = 0.5, 0.1  # the remaining 0.4 deletes the word
REGION_DROP_PROB = 0.2

# streams: independent draws for the same caption
REGION, WORD, TOKEN, FALLBACK = 1, 2, 3, 4

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = (np.uint64(s) for s in (30, 27, 31, 11))


def _mix(x):
    """splitmix64's finaliser of a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> _S30)
    x = x * _M1
    x = x ^ (x >> _S27)
    x = x * _M2
    return x ^ (x >> _S31)


def _as_u64(values):
    return np.asarray(values, dtype=np.int64).astype(np.uint64)  # two's complement: negative seeds too


def caption_keys(seed, epoch, captions, stream):
    """One uint64 key per caption for (seed, epoch, caption, stream)."""
    captions = np.asarray(captions, dtype=np.int64)
    h = _mix(np.full(captions.shape, _as_u64(seed), np.uint64) + _GOLDEN)
    for field in (_as_u64(epoch), _as_u64(captions), _as_u64(stream)):
        h = _mix((h ^ field) + _GOLDEN)
    return h


def uniform(keys, positions):
    """Uniform floats in [0, 1) for (key, position) pairs (arrays that broadcast)."""
    h = _mix((np.asarray(keys, np.uint64) ^ _as_u64(positions)) + _GOLDEN)
    return (h >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def region_keep(seed, epoch, captions, n_regions):
    """(B, R) bool: which regions each caption's image keeps; each is dropped with probability
    REGION_DROP_PROB, and an image that would lose every region keeps one drawn uniformly."""
    captions = np.asarray(captions, dtype=np.int64)
    keep = uniform(caption_keys(seed, epoch, captions, REGION)[:, None], np.arange(n_regions)) >= REGION_DROP_PROB
    empty = np.flatnonzero(~keep.any(1))
    if len(empty):
        pick = uniform(caption_keys(seed, epoch, captions[empty], FALLBACK), 0) * n_regions
        keep[empty, np.minimum(pick.astype(np.int64), n_regions - 1)] = True
    return keep


def word_outcomes(seed, epoch, piece_caption, piece_word):
    """Per word piece (its caption index and the index of its word in the caption):
    (masked, replaced, deleted) bool arrays, decided per word."""
    u = uniform(caption_keys(seed, epoch, piece_caption, WORD), piece_word)
    perturbed = u < WORD_PERTURB_PROB
    share = u / WORD_PERTURB_PROB
    masked = perturbed & (share < MASK_SHARE)
    replaced = perturbed & (share >= MASK_SHARE) & (share < MASK_SHARE + RANDOM_SHARE)
    deleted = perturbed & (share >= MASK_SHARE + RANDOM_SHARE)
    return masked, replaced, deleted


def random_tokens(seed, epoch, piece_caption, piece_position, vocab_size):
    """A uniform token id in [0, vocab_size) per piece (caption index, position in the caption)."""
    u = uniform(caption_keys(seed, epoch, piece_caption, TOKEN), piece_position)
    return np.minimum((u * vocab_size).astype(np.int64), vocab_size - 1)

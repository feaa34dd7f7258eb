"""A cache of tokenised captions, so that a COCO run (566k training captions) does not tokenise
them again at every start or resume, nor eval.py its split.

One .npz file per (caption file, tokenizer, caption count) in a cache folder: by default
$XDG_CACHE_HOME/hrem/tokens (~/.cache/hrem/tokens), or --cache_dir. Not next to the data: dataset
folders are often shared and read-only. Not in the run folder: a new run and eval.py would not
find it there.

Never stale: the file name and the key stored inside it cover the caption file (absolute path,
size, modification time in ns), a digest of the captions actually tokenised, the tokenizer (a
digest of its whole serialised definition: vocabulary, lower-casing and accent stripping,
pre-tokenizer; its max length) and the tokenizers library version. A file whose key differs, or that
is truncated or corrupted, is ignored and rebuilt. Files are written atomically (a temporary file
in the same folder, fsync, rename), and read with allow_pickle=False: nothing in them can run code.
"""
import hashlib
import json
import os
import zipfile

import numpy as np

from lib.writing import atomic_write, make_folders

FORMAT = 1
# splits with fewer captions tokenise in about a second or less: not worth a file
MIN_CAPTIONS = 20000
ARRAYS = ('ids', 'word_index', 'offsets')


def default_cache_dir():
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'hrem', 'tokens')


def resolve_cache_dir(option):
    """--cache_dir: None -> the default folder; 'none' (or '') -> no cache."""
    if option is None:
        return default_cache_dir()
    return None if option.strip().lower() in ('', 'none', 'off') else option


def tokenizer_digest(tokenizer):
    """sha256 of everything that decides the word pieces of a fast tokenizer."""
    backend = getattr(tokenizer, 'backend_tokenizer', None)
    if backend is not None:
        # truncation and padding are per-call settings (a call resets them), not the tokenisation
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ('truncation', 'padding')}
        text = json.dumps(definition, sort_keys=True)
    else:  # pragma: no cover - the project only loads fast tokenizers
        text = json.dumps(sorted(tokenizer.get_vocab().items())) + repr(getattr(tokenizer, 'do_lower_case', None))
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def captions_digest(captions):
    h = hashlib.sha256()
    for start in range(0, len(captions), 50000):
        h.update('\n'.join(captions[start:start + 50000]).encode('utf-8'))
        h.update(b'\n')
    return h.hexdigest()


def cache_key(caps_path, captions, tokenizer):
    try:
        import tokenizers
        library = tokenizers.__version__
    except ImportError:  # pragma: no cover
        library = None
    st = os.stat(caps_path)
    return {'format': FORMAT, 'caption_file': os.path.abspath(caps_path), 'size': st.st_size,
            'mtime_ns': st.st_mtime_ns, 'n_captions': len(captions), 'captions_sha256': captions_digest(captions),
            'tokenizer_sha256': tokenizer_digest(tokenizer), 'model_max_length': int(min(tokenizer.model_max_length, 2**31)),
            'tokenizers': library}


def cache_path(cache_dir, key):
    name = os.path.basename(key['caption_file']).replace('.', '_')
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f'{name}-{digest}.npz')


def _valid(arrays, n_captions):
    ids, words, offsets = (arrays[k] for k in ARRAYS)
    return (ids.ndim == words.ndim == offsets.ndim == 1 and ids.dtype == words.dtype == np.int32
            and offsets.dtype == np.int64 and len(offsets) == n_captions + 1 and offsets[0] == 0
            and offsets[-1] == len(ids) == len(words) and bool((np.diff(offsets) >= 0).all()))


def load(path, key):
    """(ids, word_index, offsets) from a cache file whose stored key equals key; None when the file
    is missing, for another key, or unreadable in any way (truncated, corrupted, wrong arrays)."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data['key'][()]) != json.dumps(key, sort_keys=True):
                return None
            arrays = {k: data[k] for k in ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile):
        return None
    return tuple(arrays[k] for k in ARRAYS) if _valid(arrays, key['n_captions']) else None


def save(path, key, ids, word_index, offsets):
    """Write atomically (lib/writing.py); a failure is a UserError naming the file and cause."""
    make_folders(os.path.dirname(path), 'the token cache folder')
    with atomic_write(path, 'wb', what='the token cache') as f:
        np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), ids=ids, word_index=word_index, offsets=offsets)

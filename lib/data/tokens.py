"""Captions as word pieces: tokenised once per split (through the token cache), with the word
each piece belongs to (the training augmentation perturbs whole words, lib/augmentation.py)."""
import itertools
import os
from dataclasses import dataclass

import numpy as np

from lib import token_cache
from lib.errors import UserError
from lib.progress import progress


@dataclass
class TokenizedCaptions:
    """All captions tokenised once, as flat word-piece ids with the word each piece belongs to."""
    ids: np.ndarray        # int32, every caption's pieces concatenated (no [CLS]/[SEP])
    word_index: np.ndarray  # int32, per piece: index of its word inside its caption
    offsets: np.ndarray    # int64, caption c is ids[offsets[c]:offsets[c + 1]]

    def __len__(self):
        return len(self.offsets) - 1

    def pieces(self, c):
        s, e = self.offsets[c], self.offsets[c + 1]
        return self.ids[s:e], self.word_index[s:e]


TOKENIZE_CHUNK = 10000  # captions per tokenizer call: bounds the tokenizer's temporary memory


def tokenize_captions(tokenizer, captions, show_progress=False, desc='tokenising'):
    # Words are split as BERT's basic tokenizer does (whitespace and punctuation); word_ids()
    # of the fast tokenizer says which word each piece came from (transformers 4.x and 5.x).
    ids, words, lengths = [], [], []
    with progress(total=len(captions), enabled=show_progress, desc=desc, unit='caption', unit_scale=True) as bar:
        for start in range(0, len(captions), TOKENIZE_CHUNK):
            enc = tokenizer(list(captions[start:start + TOKENIZE_CHUNK]), add_special_tokens=False)
            pieces = enc['input_ids']
            # one flat array per chunk (not one per caption): 566k COCO captions stay cheap
            ids.append(np.fromiter(itertools.chain.from_iterable(pieces), np.int32))
            words.append(np.fromiter(itertools.chain.from_iterable(enc.word_ids(i) for i in range(len(pieces))),
                                     np.int32))
            lengths.append(np.fromiter(map(len, pieces), np.int64, len(pieces)))
            bar.update(len(pieces))
    offsets = np.concatenate(([0], np.cumsum(np.concatenate(lengths), dtype=np.int64))) if lengths else np.zeros(1, np.int64)
    return TokenizedCaptions(np.concatenate(ids) if ids else np.zeros(0, np.int32),
                             np.concatenate(words) if words else np.zeros(0, np.int32), offsets)


def cached_tokenize(tokenizer, captions, caps_path, cache_dir, show_progress=False, desc='tokenising'):
    """tokenize_captions through the token cache (lib/token_cache.py) in cache_dir (None: no cache;
    splits under token_cache.MIN_CAPTIONS captions are not cached).
    Returns (TokenizedCaptions, what happened: a line for the log, or None)."""
    if cache_dir is None or len(captions) < token_cache.MIN_CAPTIONS:
        return tokenize_captions(tokenizer, captions, show_progress, desc), None
    key = token_cache.cache_key(caps_path, captions, tokenizer)
    path = token_cache.cache_path(cache_dir, key)
    found = token_cache.load(path, key)
    if found is not None:
        return TokenizedCaptions(*found), f'{os.path.basename(caps_path)}: tokens read from the cache {path}'
    note = ' (the cached file was unreadable or stale; rebuilt)' if os.path.exists(path) else ''
    tokens = tokenize_captions(tokenizer, captions, show_progress, desc)
    try:
        token_cache.save(path, key, tokens.ids, tokens.word_index, tokens.offsets)
    except UserError as err:  # a cache never stops a run
        return tokens, f'{os.path.basename(caps_path)}: tokens not cached ({err})'
    return tokens, f'{os.path.basename(caps_path)}: tokens written to the cache {path}{note}'


class TextSpec:
    """What caption encoding needs to know about the tokenizer."""

    def __init__(self, tokenizer, max_len=512):
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.max_len = min(max_len, tokenizer.model_max_length)

    def encode(self, piece_ids, word_index=None):
        """[CLS] + pieces + [SEP], cut to max_len (evaluation; training batches: lib/loader.py)."""
        return np.concatenate(([self.cls_id], piece_ids[:self.max_len - 2].astype(np.int64), [self.sep_id]))

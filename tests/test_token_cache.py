"""The token cache (lib/token_cache.py): used on the second start, rebuilt when the caption file or
the tokenizer changes, safe against truncated or corrupted files, written atomically."""
import os

import numpy as np
import pytest

import lib.data.tokens
from conftest import write_precomp
from lib import token_cache
from lib.data import PrecompSplit, tokenize_captions

WORDS = 'a dog cat man on the beach street park with red ball Zurich runs'.split()


def captions(n, seed=0):
    rng = np.random.default_rng(seed)
    return [' '.join(rng.choice(WORDS, int(rng.integers(2, 9)))) for _ in range(n)]


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, 'MIN_CAPTIONS', 0)  # cache even a tiny split
    write_precomp(tmp_path, 'toy', 'train', 6, captions(30))
    return tmp_path


def split(data, tokenizer, cache):
    return PrecompSplit(str(data), 'toy', 'train', tokenizer, cache_dir=str(cache))


def caps_file(data):
    return os.path.join(str(data), 'toy_precomp', 'train_caps.txt')


def cache_files(cache):
    return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


def same_tokens(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) and getattr(a, k).dtype == getattr(b, k).dtype
               for k in ('ids', 'word_index', 'offsets'))


def test_second_start_reads_the_cache_and_tokenises_nothing(data, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    first = split(data, tokenizer, cache)
    assert 'written to the cache' in first.cache_note
    assert len(cache_files(cache)) == 1 and cache_files(cache)[0].endswith('.npz')  # no temporary file left

    def no_tokenizing(*a, **k):
        raise AssertionError('tokenised although the cache holds these captions')
    monkeypatch.setattr(lib.data.tokens, 'tokenize_captions', no_tokenizing)
    second = split(data, tokenizer, cache)
    assert 'read from the cache' in second.cache_note
    assert same_tokens(first.tokens, second.tokens)
    assert same_tokens(second.tokens, tokenize_captions(tokenizer, first.captions))


def test_a_changed_caption_file_is_tokenised_again(data, tokenizer, tmp_path):
    cache = tmp_path / 'cache'
    split(data, tokenizer, cache)
    path = caps_file(data)
    new = captions(30, seed=1)
    with open(path, 'w') as f:
        f.write('\n'.join(new) + '\n')
    changed = split(data, tokenizer, cache)
    assert 'written to the cache' in changed.cache_note
    assert same_tokens(changed.tokens, tokenize_captions(tokenizer, new))
    # the same bytes with a new modification time: the key changes too (no stale read on a touch)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert 'written to the cache' in split(data, tokenizer, cache).cache_note
    assert 'read from the cache' in split(data, tokenizer, cache).cache_note


def test_the_same_mtime_and_size_but_other_captions_is_not_read_stale(data, tokenizer, tmp_path):
    cache = tmp_path / 'cache'
    split(data, tokenizer, cache)
    path = caps_file(data)
    stat = os.stat(path)
    text = open(path).read()
    swapped = text.replace('dog', 'cat').replace('beach', 'ball!')  # same size: 'beach' and 'ball!'
    assert len(swapped) == len(text) and swapped != text
    with open(path, 'w') as f:
        f.write(swapped)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = split(data, tokenizer, cache)
    assert 'written to the cache' in again.cache_note
    assert same_tokens(again.tokens, tokenize_captions(tokenizer, again.captions))


def test_another_tokenizer_does_not_read_the_cache(data, tokenizer, tmp_path):
    from transformers import AutoTokenizer
    from lib.text_model import DEMO_TEXT_MODEL
    cache = tmp_path / 'cache'
    split(data, tokenizer, cache)
    cased = AutoTokenizer.from_pretrained(DEMO_TEXT_MODEL, do_lower_case=False)  # no lower-casing
    assert 'written to the cache' in split(data, cased, cache).cache_note
    bigger = AutoTokenizer.from_pretrained(DEMO_TEXT_MODEL)
    bigger.add_tokens(['zurich'])  # another vocabulary
    other = split(data, bigger, cache)
    assert 'written to the cache' in other.cache_note
    assert same_tokens(other.tokens, tokenize_captions(bigger, other.captions))
    assert len(cache_files(cache)) == 3
    assert 'read from the cache' in split(data, tokenizer, cache).cache_note


def corrupt(path, how):
    raw = open(path, 'rb').read()
    if how == 'truncated':
        raw = raw[:len(raw) // 2]
    elif how == 'empty':
        raw = b''
    elif how == 'garbage':
        raw = os.urandom(len(raw))
    elif how == 'flipped':  # one byte of the stored arrays changed: zip's CRC check refuses it
        raw = raw[:200] + bytes([raw[200] ^ 0xFF]) + raw[201:]
    with open(path, 'wb') as f:
        f.write(raw)


@pytest.mark.parametrize('how', ['truncated', 'empty', 'garbage', 'flipped'])
def test_a_damaged_cache_file_is_ignored_and_rebuilt(data, tokenizer, tmp_path, how, capsys):
    cache = tmp_path / 'cache'
    good = split(data, tokenizer, cache).tokens
    path = os.path.join(cache, cache_files(cache)[0])
    corrupt(path, how)
    rebuilt = split(data, tokenizer, cache)
    assert 'unreadable or stale; rebuilt' in rebuilt.cache_note
    assert same_tokens(rebuilt.tokens, good)
    assert 'Traceback' not in capsys.readouterr().err
    assert 'read from the cache' in split(data, tokenizer, cache).cache_note


def test_a_cache_file_with_inconsistent_or_pickled_arrays_is_refused(data, tokenizer, tmp_path):
    cache = tmp_path / 'cache'
    first = split(data, tokenizer, cache)
    path = os.path.join(cache, cache_files(cache)[0])
    with np.load(path) as f:
        key = str(f['key'][()])
    t = first.tokens
    bad_offsets = t.offsets.copy()
    bad_offsets[-1] += 1  # points past the ids
    np.savez(path, key=np.array(key), ids=t.ids, word_index=t.word_index, offsets=bad_offsets)
    assert 'rebuilt' in split(data, tokenizer, cache).cache_note
    np.savez(path, key=np.array(key), ids=t.ids, word_index=t.word_index,
             offsets=np.array(list(t.offsets), dtype=object))  # loading it would need pickle
    assert 'rebuilt' in split(data, tokenizer, cache).cache_note
    assert same_tokens(split(data, tokenizer, cache).tokens, t)


def test_an_unwritable_cache_folder_does_not_stop_the_split(data, tokenizer, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    s = split(data, tokenizer, blocker / 'cache')
    assert 'not cached' in s.cache_note
    assert same_tokens(s.tokens, tokenize_captions(tokenizer, s.captions))


def test_small_splits_and_no_cache_dir_write_nothing(tmp_path, tokenizer, monkeypatch):
    write_precomp(tmp_path, 'toy', 'train', 6, captions(30))
    cache = tmp_path / 'cache'
    assert split(tmp_path, tokenizer, cache).cache_note is None  # 30 < MIN_CAPTIONS
    monkeypatch.setattr(token_cache, 'MIN_CAPTIONS', 0)
    assert PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer, cache_dir=None).cache_note is None
    assert cache_files(cache) == []


def test_cache_dir_option(monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert token_cache.resolve_cache_dir(None) == os.path.join(str(tmp_path), 'hrem', 'tokens')
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert token_cache.resolve_cache_dir(None) == os.path.join(os.path.expanduser('~'), '.cache', 'hrem', 'tokens')
    assert token_cache.resolve_cache_dir('none') is None
    assert token_cache.resolve_cache_dir('/some/dir') == '/some/dir'


def test_flat_tokenisation_equals_one_caption_at_a_time(tokenizer):
    caps = captions(50) + ["a dog's ball, unaffable Zürich 3.5"]
    tokens = tokenize_captions(tokenizer, caps)
    for c, text in enumerate(caps):
        enc = tokenizer(text, add_special_tokens=False)
        ids, words = tokens.pieces(c)
        assert ids.tolist() == enc['input_ids'] and words.tolist() == enc.word_ids()

"""Training-time augmentations of spec section 2 with the real MiniLM (BERT uncased) tokenizer."""
import numpy as np
import pytest
import torch

from lib.data import PrecompSplit, TextSpec, TrainDataset, collate, tokenize_captions
from conftest import write_precomp

N_DRAWS = 20000


def test_word_ids_group_the_pieces_of_a_word(tokenizer):
    caps = ['A snowboarder jumps over unbelievably tall rails, ok?', 'two dogs']
    tok = tokenize_captions(tokenizer, caps)
    assert len(tok) == 2
    for c, caption in enumerate(caps):
        ids, words = tok.pieces(c)
        assert ids.tolist() == tokenizer(caption, add_special_tokens=False)['input_ids']
        pieces = tokenizer.convert_ids_to_tokens(ids.tolist())
        # a continuation piece belongs to the word of the piece before it; any other piece starts a word
        expected, w = [], -1
        for p in pieces:
            w += 0 if p.startswith('##') else 1
            expected.append(w)
        assert words.tolist() == expected
    assert tokenizer.convert_ids_to_tokens(tok.pieces(0)[0].tolist())[1:4] == ['snow', '##board', '##er']


def outcomes(spec, ids, words, seeds):
    """Classify what happened to a one-word caption in each draw."""
    counts = {'kept': 0, 'masked': 0, 'replaced': 0, 'deleted': 0}
    for seed in seeds:
        out = spec.encode(ids, words, np.random.default_rng(seed))
        assert out[0] == spec.cls_id and out[-1] == spec.sep_id
        body = out[1:-1]
        if len(body) == 0:
            counts['deleted'] += 1
        elif (body == ids).all():
            counts['kept'] += 1
        elif (body == spec.mask_id).all():
            counts['masked'] += 1
        else:
            # a replaced word: every piece replaced (none kept, none masked)
            assert len(body) == len(ids) and not (body == ids).any() and not (body == spec.mask_id).any()
            counts['replaced'] += 1
    return {k: v / len(seeds) for k, v in counts.items()}


def test_word_perturbation_shares_whole_words(tokenizer):
    spec = TextSpec(tokenizer)
    tok = tokenize_captions(tokenizer, ['snowboarder'])
    ids, words = tok.pieces(0)
    assert len(ids) == 3 and (words == 0).all()
    got = outcomes(spec, ids, words, range(N_DRAWS))
    want = {'kept': 0.8, 'masked': 0.2 * 0.5, 'replaced': 0.2 * 0.1, 'deleted': 0.2 * 0.4}
    for k, p in want.items():
        assert abs(got[k] - p) < 5 * np.sqrt(p * (1 - p) / N_DRAWS), (k, got[k], p)


def test_words_are_perturbed_independently(tokenizer):
    spec = TextSpec(tokenizer)
    caption = 'one two three four five six seven eight nine ten'
    ids, words = tokenize_captions(tokenizer, [caption]).pieces(0)
    assert len(ids) == 10
    n = 4000
    lengths, masks = [], []
    for seed in range(n):
        body = spec.encode(ids, words, np.random.default_rng(seed))[1:-1]
        lengths.append(len(body))
        masks.append(int((body == spec.mask_id).sum()))
    deleted = 10 - np.mean(lengths)
    assert abs(deleted / 10 - 0.08) < 0.01 and abs(np.mean(masks) / 10 - 0.1) < 0.01
    assert np.var(lengths) == pytest.approx(10 * 0.08 * 0.92, rel=0.15)  # binomial: independent words


def test_encode_is_deterministic_and_adds_special_tokens(tokenizer):
    spec = TextSpec(tokenizer)
    ids, words = tokenize_captions(tokenizer, ['a snowboarder jumps over unbelievably tall rails']).pieces(0)
    plain = spec.encode(ids, words)
    assert plain.tolist() == tokenizer('a snowboarder jumps over unbelievably tall rails')['input_ids']
    draws = [spec.encode(ids, words, np.random.default_rng(s)).tolist() for s in range(30)]
    assert draws == [spec.encode(ids, words, np.random.default_rng(s)).tolist() for s in range(30)]
    assert len({tuple(d) for d in draws}) > 5
    assert all(d[0] == tokenizer.cls_token_id and d[-1] == tokenizer.sep_token_id for d in draws)


@pytest.fixture
def split(tmp_path, tokenizer):
    caps = [f'a dog number {i} runs on a snowboarder beach' for i in range(5 * 40)]
    write_precomp(tmp_path, 'toy', 'train', 40, caps, regions=50, dim=6)
    return PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer)


def test_size_augmentation_drops_a_fifth_of_the_regions(split):
    data = TrainDataset(split, seed=3)
    images = split.images
    kept = 0
    for index in range(len(data)):
        regions, ids, cap, img = data[index]
        assert cap == index and img == index // 5
        original = np.asarray(images[img])
        # the kept regions are rows of the image, in their order
        rows = [int(np.flatnonzero((original == r).all(1))[0]) for r in regions]
        assert rows == sorted(rows) and len(set(rows)) == len(rows) >= 1
        kept += len(regions)
    frac_dropped = 1 - kept / (len(data) * 50)
    assert abs(frac_dropped - 0.2) < 5 * np.sqrt(0.16 / (len(data) * 50))
    # repeatable per (seed, epoch, index), different across epochs
    again = TrainDataset(split, seed=3)
    assert all(np.array_equal(data[i][0], again[i][0]) and np.array_equal(data[i][1], again[i][1]) for i in range(10))
    again.set_epoch(1)
    assert any(len(data[i][0]) != len(again[i][0]) for i in range(10))


def test_size_augmentation_never_drops_every_region(tmp_path, tokenizer):
    write_precomp(tmp_path, 'toy', 'train', 400, [f'cap {i}' for i in range(400)], regions=1, dim=3)
    data = TrainDataset(PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer), text_augment=False)
    assert all(len(data[i][0]) == 1 for i in range(len(data)))  # about 80 draws would drop it


def test_augmentations_can_be_switched_off(split):
    data = TrainDataset(split, size_augment=False, text_augment=False)
    for i in range(0, len(data), 17):
        regions, ids, _, img = data[i]
        np.testing.assert_array_equal(regions, split.images[img])
        assert ids.tolist() == split.text.encode(*split.tokens.pieces(i)).tolist()


def test_collate_pads_and_carries_lengths(split):
    data = TrainDataset(split, seed=0)
    items = [data[i] for i in (0, 7, 13, 42)]
    batch = collate(items)
    r_len, t_len = batch['region_lengths'], batch['token_lengths']
    assert r_len.tolist() == [len(it[0]) for it in items] and t_len.tolist() == [len(it[1]) for it in items]
    assert batch['regions'].shape == (4, int(r_len.max()), 6) and batch['tokens'].dtype == torch.long
    for b, (regions, ids, cap, img) in enumerate(items):
        torch.testing.assert_close(batch['regions'][b, :len(regions)], torch.as_tensor(regions))
        assert (batch['regions'][b, len(regions):] == 0).all()
        assert batch['tokens'][b, :len(ids)].tolist() == ids.tolist()
        assert (batch['tokens'][b, len(ids):] == 0).all()
    assert batch['img_ids'].tolist() == [0, 1, 2, 8] and batch['caption_ids'].tolist() == [0, 7, 13, 42]


def test_collate_of_memory_mapped_rows_copies_them(split):
    import warnings
    data = TrainDataset(split, size_augment=False, text_augment=False)
    items = [data[i] for i in (0, 5)]
    assert not items[0][0].flags.writeable  # a view of the read-only memory map
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # torch warns on non-writable arrays
        batch = collate(items)
    batch['regions'] += 1  # the batch owns its memory
    np.testing.assert_array_equal(split.images[0], data[0][0])


def test_captions_longer_than_the_text_model_limit_are_truncated(tokenizer):
    """[CLS] + the first limit - 2 pieces + [SEP], as the tokenizer's own truncation gives; with
    augmentation too; and a text encoder with exactly that many positions takes it."""
    from conftest import tiny_bert
    from lib.encoders import TextEncoder
    limit = tokenizer.model_max_length
    caption = ' '.join(['a snowboarder jumps over the rails'] * 120)  # about 720 pieces
    spec = TextSpec(tokenizer)
    ids, words = tokenize_captions(tokenizer, [caption]).pieces(0)
    assert len(ids) > limit
    want = tokenizer(caption, truncation=True, max_length=limit)['input_ids']
    assert len(want) == limit
    assert spec.encode(ids, words).tolist() == want
    augmented = [spec.encode(ids, words, np.random.default_rng(s)) for s in range(5)]
    assert all(len(a) == limit and a[0] == spec.cls_id and a[-1] == spec.sep_id for a in augmented)
    bert = tiny_bert()
    assert bert.config.max_position_embeddings == limit
    encoder = TextEncoder(bert, 32, 4, 0.0, 0.8).eval()
    tokens = torch.tensor(np.stack([spec.encode(ids, words)] + augmented[:1]))
    emb, _ = encoder(tokens, torch.tensor([limit, limit]))
    assert emb.shape == (2, 32) and torch.isfinite(emb).all()


def test_tokenising_across_chunk_boundaries_equals_one_call(tokenizer, monkeypatch):
    import lib.data
    caps = [f'caption {i}: a snowboarder jumps over {"tall " * (i % 4)}rails' for i in range(11)]
    monkeypatch.setattr(lib.data, 'TOKENIZE_CHUNK', 3)  # chunks of 3, 3, 3, 2
    got = tokenize_captions(tokenizer, caps)
    one = tokenizer(caps, add_special_tokens=False)  # the reference: one call for all
    assert len(got) == len(caps)
    for c in range(len(caps)):
        ids, words = got.pieces(c)
        assert ids.tolist() == one['input_ids'][c], c
        assert words.tolist() == one.word_ids(c), c

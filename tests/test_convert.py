"""tools/convert_checkpoint.py and the key mapping (lib/checkpoint.py) in both directions.

Authors'-format checkpoints are built as in test_authors_checkpoint.py (their module names and
layout), with a small text model: nothing here depends on sizes.
"""
import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import arguments
from lib import checkpoint as ckpt_lib
from lib.encoders import TextEncoder
from lib.errors import UserError
from lib.models import HREM, config_from_args
from tools import convert_checkpoint
from test_authors_checkpoint import (D, SMALL_E, TheirImageEncoder, TheirTextEncoder,  # noqa: F401 (fixture)
                                     save_their_checkpoint, small_bert_dir, their_states)

# What their VSEModel(opt, eval=True), evalrank and data loaders read from opt.
THEIR_LOADER_OPT = ('img_dim', 'embed_size', 'no_imgnorm', 'no_txtnorm', 'nhead', 'dropout', 'residual_weight',
                    'grad_clip', 'mask_repeat', 'margin', 'max_violation', 'multi_gpu', 'dataset', 'data_path',
                    'batch_size', 'workers', 'bert_path', 'size_augment', 'base_loss', 'gnn_loss')

# Their loader, in a fresh interpreter that sees neither this project nor its tests (-I): the file
# must unpickle from torch and argparse alone, with or without weights_only.
THEIR_LOAD = r'''
import argparse, json, sys, torch
path = sys.argv[1]
full = torch.load(path, map_location='cpu', weights_only=False)
with torch.serialization.safe_globals([argparse.Namespace]):
    safe = torch.load(path, map_location='cpu', weights_only=True)
assert sorted(full) == sorted(safe)
print(json.dumps({'keys': sorted(full), 'opt': type(full['opt']).__module__ + '.' + type(full['opt']).__name__,
                  'n_states': len(full['model']),
                  'project_modules': sorted(m for m in sys.modules
                                            if m.split('.')[0] in ('lib', 'arguments', 'tools'))}))
'''


def read(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_states(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize('position_ids', [True, False])
def test_theirs_to_ours_to_theirs_is_identity(tmp_path, small_bert_dir, position_ids, capsys):
    img, txt = their_states(small_bert_dir, seed=1, position_ids=position_ids, embed=SMALL_E)
    theirs = str(save_their_checkpoint(tmp_path / 'model_best.pth', img, txt))
    ours, back = str(tmp_path / 'ours.pth'), str(tmp_path / 'back.pth')

    convert_checkpoint.main([theirs, ours, '--bert_path', small_bert_dir])
    assert 'every key checked' in capsys.readouterr().out
    mid = read(ours)
    assert mid['format'] == ckpt_lib.FORMAT and mid['model']['relation'] is None and mid['optimizer'] is None
    assert_same_states(mid['model']['img_enc'], img)
    assert_same_states(mid['model']['txt_enc'], txt)

    convert_checkpoint.main([ours, back, '--to', 'authors'])
    original, again = read(theirs), read(back)
    assert sorted(again) == sorted(original) == ['Eiters', 'best_rsum', 'epoch', 'model', 'opt']
    for a, b in zip(again['model'], original['model']):
        assert_same_states(a, b)
    assert vars(again['opt']) == vars(original['opt'])
    assert (again['epoch'], again['best_rsum'], again['Eiters']) == (23, 524.1, 26013)


def test_ours_to_theirs_loads_in_their_code(tmp_path, small_bert_dir):
    from transformers import BertConfig, BertModel
    args = arguments.parse_train_args(['--dataset', 'f30k', '--bert_path', small_bert_dir,
                                       '--embed_size', str(SMALL_E), '--nhead', '8'])
    torch.manual_seed(0)
    model = HREM(config_from_args(args, D), BertModel(BertConfig.from_pretrained(small_bert_dir)))
    ours, theirs, again = (str(tmp_path / f) for f in ('ours.pth', 'theirs.pth', 'again.pth'))
    ckpt_lib.save_atomic(ckpt_lib.make_checkpoint(model, args, 4, 400, 300.0), ours)
    convert_checkpoint.main([ours, theirs, '--to', 'authors', '--bert_path', small_bert_dir])

    out = subprocess.run([sys.executable, '-I', '-c', THEIR_LOAD, theirs], cwd=tmp_path, capture_output=True,
                         text=True, check=True)
    loaded = json.loads(out.stdout)
    assert loaded == {'keys': ['Eiters', 'best_rsum', 'epoch', 'model', 'opt'], 'opt': 'argparse.Namespace',
                      'n_states': 2, 'project_modules': []}

    ckpt = read(theirs)
    opt = ckpt['opt']
    missing = [k for k in THEIR_LOADER_OPT if not hasattr(opt, k)]
    assert not missing
    assert (opt.img_dim, opt.embed_size, opt.nhead) == (D, SMALL_E, 8)
    # their modules, built from opt as their VSEModel does, take the states strictly
    img_enc = TheirImageEncoder(opt.embed_size, opt.nhead)
    txt_enc = TheirTextEncoder(small_bert_dir, opt.embed_size, opt.nhead)
    img_enc.load_state_dict(ckpt['model'][0], strict=True)
    txt_enc.load_state_dict(ckpt['model'][1], strict=True)
    assert torch.equal(img_enc.aggr.layers[0].linear1.weight, model.img_enc.aggr.layers[0].linear1.weight)
    assert torch.equal(txt_enc.bert.encoder.layer[0].attention.self.query.weight,
                       model.txt_enc.bert.encoder.layer[0].attention.self.query.weight)

    # and back: the encoders are unchanged; their format has no relation module
    convert_checkpoint.main([theirs, again])
    back = read(again)
    assert_same_states(back['model']['img_enc'], model.img_enc.state_dict())
    assert_same_states(back['model']['txt_enc'], model.txt_enc.state_dict())
    assert back['model']['relation'] is None and back['options']['nhead'] == 8


@pytest.fixture
def text_encoder(small_bert_dir):
    from transformers import BertConfig, BertModel
    return TextEncoder(BertModel(BertConfig.from_pretrained(small_bert_dir)), SMALL_E, nhead=8)


def test_position_ids_tolerated_in_either_direction(text_encoder):
    state = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    assert 'bert.embeddings.position_ids' not in state  # transformers 5.x does not save it
    with_ids = {**state, 'bert.embeddings.position_ids': torch.arange(512).expand(1, -1)}
    ckpt_lib.load_module_state(text_encoder, with_ids, 'text encoder', 'their.pth')
    # a transformers version that saves the buffer, given a checkpoint without it
    emb = text_encoder.bert.embeddings
    emb.register_buffer('position_ids', torch.arange(512).expand(1, -1).clone(), persistent=True)
    assert 'bert.embeddings.position_ids' in text_encoder.state_dict()
    ckpt_lib.load_module_state(text_encoder, state, 'text encoder', 'ours.pth')
    assert torch.equal(emb.position_ids, torch.arange(512).expand(1, -1))
    assert_same_states({k: v for k, v in text_encoder.state_dict().items() if 'position_ids' not in k}, state)


@pytest.mark.parametrize('change, named', [
    ('missing', ["missing keys ['linear.bias']"]),
    ('unexpected', ["unexpected keys ['bert.embeddings.token_type_ids']"]),
    ('shape', ['linear.weight', f'checkpoint ({SMALL_E}, 16) vs model ({SMALL_E}, 32)']),
])
def test_any_other_key_difference_is_an_error_naming_it(text_encoder, change, named):
    state = dict(text_encoder.state_dict())
    if change == 'missing':
        del state['linear.bias']
    elif change == 'unexpected':  # a version-dependent-looking key that is not the tolerated one
        state['bert.embeddings.token_type_ids'] = torch.zeros(1, 512, dtype=torch.long)
    else:
        state['linear.weight'] = torch.zeros(SMALL_E, 16)
    before = text_encoder.linear.weight.clone()
    with pytest.raises(UserError) as err:
        ckpt_lib.load_module_state(text_encoder, state, 'text encoder', 'their.pth')
    for text in named + ['their.pth', 'text encoder']:
        assert text in str(err.value)
    assert torch.equal(text_encoder.linear.weight, before)  # nothing half-loaded


def test_converter_reports_a_mismatch_and_writes_nothing(tmp_path, small_bert_dir, capsys):
    img, txt = their_states(small_bert_dir, seed=2, embed=SMALL_E)
    img['aggr.layers.0.linear1.weight'] = torch.zeros(SMALL_E, SMALL_E + 1)
    theirs = str(save_their_checkpoint(tmp_path / 'model_best.pth', img, txt))
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([theirs, str(tmp_path / 'ours.pth'), '--bert_path', small_bert_dir])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f'aggr.layers.0.linear1.weight: checkpoint ({SMALL_E}, {SMALL_E + 1}) vs model ({SMALL_E}, {SMALL_E})' in err
    assert not (tmp_path / 'ours.pth').exists()


def test_converter_refuses_to_overwrite_its_input(tmp_path, small_bert_dir, capsys):
    img, txt = their_states(small_bert_dir, seed=2, embed=SMALL_E)
    theirs = str(save_their_checkpoint(tmp_path / 'model_best.pth', img, txt))
    with pytest.raises(SystemExit):
        convert_checkpoint.main([theirs, theirs])
    assert 'is the file being converted' in capsys.readouterr().err
    assert len(read(theirs)['model']) == 2


def test_config_differences_name_what_loads_silently():
    from lib.models import HREMConfig
    saved = HREMConfig(nhead=16, residual_weight=0.8, img_dim=2048, bert_path='theirs')
    ckpt = {'config': dataclasses.asdict(saved)}
    # img_dim and the text model's folder are not options of the architecture's computation
    now = dataclasses.replace(saved, nhead=8, img_dim=12, bert_path='ours')
    assert ckpt_lib.config_differences(ckpt, now) == [('nhead', 16, 8)]

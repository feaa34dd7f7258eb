"""The model configuration and the one loader: a checkpoint written before the configuration
existed evaluates to the numbers it gave then; the config is saved apart from the run's options;
exported safetensors folders load without unpickling and give the checkpoint's similarities."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import eval as eval_script
from lib import checkpoint as ckpt_lib
from lib.models import HREMConfig, config_from_dict, create_model, load_model
from lib.sims_file import load_sims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'ckpt_5f4dd7a')


def evaluate(tmp_path, model_path, name):
    sims = tmp_path / f'{name}.npy'
    results = eval_script.main(['--checkpoint', str(model_path), '--device', 'cpu', '--cache_dir', 'none',
                                '--data_path', os.path.join(FIXTURE, 'data'), '--dataset', 'tiny',
                                '--bert_path', os.path.join(FIXTURE, 'text_model'), '--save_sims', str(sims)])
    return results, load_sims(str(sims))


def test_a_checkpoint_of_5f4dd7a_evaluates_to_its_numbers(tmp_path):
    results, sims = evaluate(tmp_path, os.path.join(FIXTURE, 'model_best.pth'), 'now')
    then = load_sims(os.path.join(FIXTURE, 'sims_5f4dd7a.npy'))
    assert np.array_equal(sims, then)
    with open(os.path.join(FIXTURE, 'results_5f4dd7a.json')) as f:
        assert results == json.load(f)


def test_an_old_checkpoint_reads_into_config_and_options():
    ckpt = ckpt_lib.read_checkpoint(os.path.join(FIXTURE, 'model_best.pth'))
    config = config_from_dict(ckpt['config'])
    # the values its run was given on the command line (make.py), the sizes read off the weights
    assert (config.embed_size, config.nhead, config.warmup, config.img_dim) == (16, 2, 2, 12)
    assert ckpt['options']['batch_size'] == 8 and ckpt['format'] == ckpt_lib.FORMAT
    # the relation Transformer's keys under their current name
    assert any(k.startswith('transformer.') for k in ckpt['model']['relation'])
    assert not any(k.startswith('gnn.') for k in ckpt['model']['relation'])


def test_the_authors_opt_maps_into_the_config():
    import argparse
    opt = argparse.Namespace(embed_size=64, nhead=8, residual_weight=0.6, warmup=8000, trip_cutoff=1.9,
                             data_name='coco', batch_size=256, learning_rate=5e-4)
    state = {'fc.fc.weight': torch.zeros(64, 2048)}
    ckpt = ckpt_lib.from_authors({'model': [state, {'linear.weight': torch.zeros(64, 32)}], 'opt': opt})
    config = config_from_dict({**ckpt['options'], **ckpt_lib.architecture(ckpt)})
    assert (config.embed_size, config.nhead, config.residual_weight, config.trip_cutoff, config.img_dim) == \
        (64, 8, 0.6, 1.9, 2048)
    assert config.fragment_transformer == HREMConfig().fragment_transformer  # absent from their opt: our default


def test_new_checkpoints_keep_the_config_apart_from_run_local_options(tmp_path):
    import arguments
    from conftest import tiny_bert
    args = arguments.parse_train_args(['--embed_size', '32', '--nhead', '4', '--logger_name', str(tmp_path / 'r'),
                                       '--device', 'cpu'])
    config = config_from_dict({**vars(args), 'img_dim': 24})
    model = create_model(config, tiny_bert())
    ckpt = ckpt_lib.make_checkpoint(model, args, 1, 10, 0.0)
    assert ckpt['config'] == dataclasses.asdict(config)
    assert not set(ckpt_lib.RUN_LOCAL_OPTIONS) & set(ckpt['options'])
    assert ckpt['options']['embed_size'] == 32 and ckpt['options']['seed'] == args.seed


def export(tmp_path):
    out = tmp_path / 'exported'
    from tools import convert_checkpoint
    convert_checkpoint.main([os.path.join(FIXTURE, 'model_best.pth'), str(out), '--to', 'safetensors',
                             '--bert_path', os.path.join(FIXTURE, 'text_model')])
    return out


def test_exported_weights_give_the_checkpoints_similarities(tmp_path):
    out = export(tmp_path)
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'text_model']
    _, from_export = evaluate(tmp_path, out, 'export')
    _, from_ckpt = evaluate(tmp_path, os.path.join(FIXTURE, 'model_best.pth'), 'ckpt')
    assert np.array_equal(from_export, from_ckpt)
    # the relation module travels too
    loaded, ours = load_model(str(out)), load_model(os.path.join(FIXTURE, 'model_best.pth'),
                                                     bert_path=os.path.join(FIXTURE, 'text_model'))
    for a, b in zip(loaded.model.state_dict().values(), ours.model.state_dict().values()):
        assert torch.equal(a, b)
    # the same config but for where the text model's files are: the export carries its own copy
    assert dataclasses.replace(loaded.config, bert_path='') == dataclasses.replace(ours.config, bert_path='')
    assert loaded.config.bert_path == str(out / 'text_model')


def test_an_exported_folder_loads_without_unpickling(tmp_path):
    """In a fresh process where every unpickling entry point raises, the folder still loads and
    scores; the same process cannot read the .pth (the check itself works)."""
    out = export(tmp_path)
    code = f'''
import pickle, sys, torch
sys.path.insert(0, {ROOT!r})
import torch._dynamo  # imported before the poisoning below (it subclasses pickle.Unpickler)
from lib.models import load_model
def refuse(*a, **k):
    raise RuntimeError('unpickling attempted')
torch.load = torch.serialization.load = refuse
pickle.load = pickle.loads = refuse
m = load_model({str(out)!r})
print(sum(float(p.sum()) for p in m.model.parameters()))
try:
    load_model({os.path.join(FIXTURE, 'model_best.pth')!r})
except Exception as err:
    print('pth refused:', err)
'''
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'pth refused:' in done.stdout and 'unpickling attempted' in done.stdout


def test_a_broken_export_is_one_line(tmp_path, capsys):
    out = export(tmp_path)
    with open(out / 'model.safetensors', 'r+b') as f:
        f.truncate(100)
    with pytest.raises(SystemExit) as err:
        eval_script.main(['--checkpoint', str(out), '--device', 'cpu'])
    assert err.value.code != 0
    message = capsys.readouterr().err.strip()
    assert 'unreadable export' in message and '\n' not in message
    shutil.rmtree(out)
    with pytest.raises(SystemExit):
        eval_script.main(['--checkpoint', str(tmp_path), '--device', 'cpu'])
    assert 'is not an exported model' in capsys.readouterr().err

"""train.py --config FILE: a run's options.json replays it; precedence profile < file < command
line; run-local keys are not replayed; a wrong file is one line naming it."""
import json
import os

import numpy as np
import pytest

import arguments
import train
from lib.sims_file import load_sims
from test_errors import assert_user_error, bert_folder, make_data, run_main, train_argv


def write(path, values):
    path.write_text(json.dumps(values))
    return str(path)


def test_a_replayed_run_reproduces_the_original_to_the_digit(tmp_path):
    make_data(tmp_path)
    bert = bert_folder(tmp_path / 'bert')
    # non-default options of every kind: int, float, list, store_true, BooleanOptionalAction, choices
    train.main(train_argv(tmp_path, bert, 'a', '--warmup', '3', '--learning_rate', '1e-3', '--lr_schedules', '1', '3',
                          '--max_violation', '--no-compile', '--base_loss', 'vse', '--num_epochs', '2', '--seed', '5'))
    a, b = tmp_path / 'a', tmp_path / 'b'
    # --device is run-local: given here so that a CUDA machine runs the replay on the CPU as well
    train.main(['--config', str(a / 'options.json'), '--logger_name', str(b), '--device', 'cpu'])
    first, again = (json.loads((run / 'results.json').read_text()) for run in (a, b))
    assert first['results'] == again['results'] and first['epoch'] == again['epoch']
    assert np.array_equal(load_sims(str(a / 'results_tiny.npy')), load_sims(str(b / 'results_tiny.npy')))
    options = [json.loads((run / 'options.json').read_text()) for run in (a, b)]
    for o in options:
        del o['logger_name'], o['config']
    assert options[0] == options[1]


def test_precedence_is_profile_then_file_then_command_line(tmp_path):
    coco = arguments.get_train_parser('coco').parse_args([])
    path = write(tmp_path / 'o.json', {'dataset': 'coco', 'batch_size': 7, 'lr_schedules': [4, 5]})
    args = arguments.parse_train_args(['--config', path])
    assert (args.batch_size, args.lr_schedules) == (7, [4, 5])  # the file over the coco profile (256)
    assert args.trip_cutoff == coco.trip_cutoff == 1.9 and args.mask_weight == 1.5  # the rest: coco's profile
    args = arguments.parse_train_args(['--batch_size', '9', '--config', path, '--lr_schedules', '6'])
    assert (args.batch_size, args.lr_schedules) == (9, [6])  # the command line over the file, wherever it stands
    args = arguments.parse_train_args(['--config', path, '--dataset', 'f30k'])
    assert args.dataset == 'f30k' and args.trip_cutoff == 1.7 and args.batch_size == 7  # f30k's profile, the file


def test_run_local_keys_are_not_replayed(tmp_path):
    path = write(tmp_path / 'o.json', {'logger_name': '/elsewhere', 'device': 'cuda:7', 'resume': '/x.pth',
                                       'overwrite': True, 'config': '/other.json', 'dataset': 'f30k'})
    args = arguments.parse_train_args(['--config', path])
    assert (args.logger_name, args.device, args.resume, args.overwrite) == (os.path.join('runs', 'f30k'), None,
                                                                            None, False)
    assert args.config == path


def test_yaml_gives_what_json_gives(tmp_path):
    pytest.importorskip('yaml')
    (tmp_path / 'o.yaml').write_text('dataset: coco\nbatch_size: 7\nlr_schedules: [4, 5]\ntf32: true\n'
                                     'max_violation: true\n')
    json_path = write(tmp_path / 'o.json', {'dataset': 'coco', 'batch_size': 7, 'lr_schedules': [4, 5],
                                            'tf32': True, 'max_violation': True})
    from_yaml = vars(arguments.parse_train_args(['--config', str(tmp_path / 'o.yaml')]))
    from_json = vars(arguments.parse_train_args(['--config', json_path]))
    assert from_yaml.pop('config') != from_json.pop('config')
    assert from_yaml == from_json and from_json['tf32'] and from_json['batch_size'] == 7


@pytest.mark.parametrize('content, fragment', [
    ({'embed_sise': 32}, "unknown option 'embed_sise'"),
    ({'embed_size': 'big'}, "argument --embed_size: invalid positive_int value: 'big'"),
    ({'fragment_transformer': 'all'}, 'invalid choice'),
    ([1, 2], 'holds a list; expected a mapping'),
    ('{"a": ', 'is not valid JSON'),
])
def test_a_wrong_file_is_one_line_naming_it(tmp_path, capsys, content, fragment):
    path = tmp_path / 'o.json'
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    code, err = run_main(train.main, ['--config', str(path)], capsys)
    assert_user_error(code, err, str(path), fragment)


def test_config_and_resume_do_not_mix(tmp_path, capsys):
    path = write(tmp_path / 'o.json', {'dataset': 'f30k'})
    code, err = run_main(train.main, ['--config', path, '--resume', str(tmp_path / 'x.pth')], capsys)
    assert_user_error(code, err, '--resume', '--config')

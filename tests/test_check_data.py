"""tools/check_data.py: each usual mistake, built on a tiny synthetic layout, is named with its fix;
correct f30k- and coco-shaped layouts are ready. Also the shared checks that train.py reads through
and the progress bars."""
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from lib import progress as progress_lib
from lib.data import PrecompSplit, load_captions, load_images
from lib.errors import UserError
from lib.text_model import DEMO_TEXT_MODEL, check_location
from tools import check_data
from conftest import write_precomp

# small stand-ins for the standard sizes (images per split), passed in as the expectation
SMALL = {'f30k': {'train': 6, 'dev': 3, 'test': 2}, 'coco': {'train': 7, 'dev': 4, 'test': 2, 'testall': 4}}


def captions(n_images, per_image=5):
    return [f'a photo number {i} of image {i // per_image}' for i in range(n_images * per_image)]


def make_layout(root, dataset, sizes=None):
    """<root>/<dataset>_precomp with the SMALL sizes, five captions per image, float32."""
    for seed, (split, n) in enumerate((sizes or SMALL[dataset]).items()):
        write_precomp(root, dataset, split, n, captions(n), seed=seed)
    return os.path.join(str(root), f'{dataset}_precomp')


def run(root, dataset='f30k', bert=DEMO_TEXT_MODEL, **kw):
    return check_data.check(str(root), dataset, bert, standard_sizes=SMALL, **kw)


def lines(report, severity=check_data.PROBLEM):
    return [f.line() for f in report.findings if f.severity == severity]


def only_problem(report, *parts):
    problems = lines(report)
    assert len(problems) == 1, problems
    for part in parts:
        assert part in problems[0], (part, problems[0])
    return report.problems[0]


def shell(command):
    subprocess.run(command, shell=True, check=True)


# ----------------------------------------------------------------------------- ready layouts

@pytest.mark.parametrize('dataset', ['f30k', 'coco'])
def test_correct_layout_is_ready_with_its_sizes(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(check_data, 'PAGE_CACHE_ADVICE_BYTES', 0)  # advice is for large files only
    make_layout(tmp_path, dataset)
    report = run(tmp_path, dataset)
    assert report.ready and not report.findings
    (d,) = report.datasets
    got = {s.name: (s.images, s.regions, s.feature_size, s.dtype, s.captions, s.per_image, s.bytes) for s in d.splits}
    folder = os.path.join(tmp_path, f'{dataset}_precomp')
    assert got == {split: (n, 4, 8, 'float32', 5 * n, 5, os.path.getsize(os.path.join(folder, f'{split}_ims.npy')))
                   for split, n in SMALL[dataset].items()}
    needs = '\n'.join(check_data.run_needs(d))
    train_bytes = SMALL[dataset]['train'] * 4 * 8 * 4
    assert check_data.size_text(train_bytes + 128) in needs  # the page cache the training features need
    half = check_data.size_text(train_bytes // 2)
    assert f'float16 files (tools/convert_features.py --dtype float16) would need {half}' in needs
    assert f'model selection: dev, its first {5 * SMALL[dataset]["dev"]} captions' in needs
    test = 'testall' if dataset == 'coco' else 'test'
    assert f'final test: {test}, {SMALL[dataset][test]} images' in needs


def test_main_prints_table_and_verdict_and_exits_0_when_ready(tmp_path, capsys, monkeypatch):
    make_layout(tmp_path, 'f30k')
    make_layout(tmp_path, 'coco')
    monkeypatch.setattr(check_data, 'STANDARD_SIZES', SMALL)
    with pytest.raises(SystemExit) as code:  # no --dataset: every <name>_precomp folder
        check_data.main(['--data_path', str(tmp_path), '--bert_path', DEMO_TEXT_MODEL])
    out = capsys.readouterr().out
    assert code.value.code == 0 and out.rstrip().endswith('verdict: ready to train')
    assert re.search(r'^\s+testall\s+4\s+4\s+8\s+float32\s+20\s+5\s', out, re.M)
    assert re.search(r'^\s+train\s+6\s+4\s+8\s+float32\s+30\s+5\s', out, re.M)
    with pytest.raises(SystemExit) as code:
        check_data.main(['--data_path', str(tmp_path), '--dataset', 'coco', '--bert_path', DEMO_TEXT_MODEL, '--json'])
    doc = json.loads(capsys.readouterr().out)
    assert code.value.code == 0 and doc['ready'] and [d['name'] for d in doc['datasets']] == ['coco']
    assert [s['images'] for s in doc['datasets'][0]['splits']] == [7, 4, 2, 4]


def test_float16_features_are_valid(tmp_path, monkeypatch):
    folder = make_layout(tmp_path, 'f30k')
    np.save(os.path.join(folder, 'train_ims.npy'), np.ones((6, 4, 8), np.float16))
    report = run(tmp_path)
    assert report.ready and report.datasets[0].splits[0].dtype == 'float16'
    monkeypatch.setattr(check_data, 'PAGE_CACHE_ADVICE_BYTES', 0)  # advice is for large files only
    assert 'the features are float16 already' in '\n'.join(check_data.run_needs(report.datasets[0]))


def test_tiny_files_get_no_page_cache_advice(tmp_path):
    make_layout(tmp_path, 'f30k')
    needs = check_data.run_needs(run(tmp_path).datasets[0])
    assert needs and not any('page cache' in line for line in needs)


# ----------------------------------------------------------------------------- standard sizes

def test_partial_missing_and_wrongly_captioned_splits_against_standard_sizes(tmp_path, capsys):
    folder = make_layout(tmp_path, 'f30k', {'train': 5, 'dev': 3})  # train partial, test missing
    write_precomp(tmp_path, 'f30k', 'dev', 3, captions(3, per_image=1))  # one caption per image
    report = run(tmp_path)
    problems = lines(report)
    assert len(problems) == 3, problems
    assert f'{folder}/train_ims.npy has 5 images; the standard f30k train split has 6' in problems[0]
    assert 'download and unpack it again' in problems[0]
    assert f'{folder}/dev_caps.txt: 15 = 5 x 3 images expected for the standard f30k dev split, 3 found' in problems[1]
    assert 'fix: take the caption file from the same archive as the features' in problems[1]
    assert f'{folder} has no test split (2 images expected)' in problems[2]
    assert 'unpack test_ims.npy and test_caps.txt' in problems[2]
    with pytest.raises(SystemExit) as code:
        check_data.main(['--data_path', str(tmp_path), '--dataset', 'f30k', '--bert_path', DEMO_TEXT_MODEL])
    assert code.value.code == 1  # the real standard sizes: every split is partial
    out = capsys.readouterr().out
    assert 'verdict: NOT ready to train, 3 problem(s):' in out and 'the standard f30k train split has 29000' in out


def test_coco_without_testall(tmp_path):
    folder = make_layout(tmp_path, 'coco', {k: v for k, v in SMALL['coco'].items() if k != 'testall'})
    only_problem(run(tmp_path, 'coco'), f'{folder} has no testall split (4 images expected)',
                 "train.py's final test uses it", f'fix: unpack testall_ims.npy and testall_caps.txt from the coco')


def test_a_split_with_one_of_its_two_files(tmp_path):
    folder = make_layout(tmp_path, 'f30k')
    os.unlink(os.path.join(folder, 'dev_caps.txt'))
    only_problem(run(tmp_path), f'split dev: {folder}/dev_ims.npy has no dev_caps.txt beside it',
                 f'fix: extract dev_caps.txt from the archive into {folder}')


# ----------------------------------------------------------------------------- unpacking mistakes

def test_one_folder_level_too_deep(tmp_path):
    inner = make_layout(tmp_path / 'f30k_precomp', 'f30k')  # data/f30k_precomp/f30k_precomp/...
    outer = str(tmp_path / 'f30k_precomp')
    only_problem(run(tmp_path), f'the split files lie in {inner}: 1 folder level too deep',
                 f'fix: mv {inner}/* {outer}/ and delete the emptied folder', f'or pass --data_path {outer}')
    shell(f'mv {inner}/* {outer}/ && rmdir {inner}')
    assert run(tmp_path).ready


def test_files_a_level_too_deep_are_checked_there_too(tmp_path):
    inner = make_layout(tmp_path / 'f30k_precomp', 'f30k')
    write_precomp(tmp_path / 'f30k_precomp', 'f30k', 'dev', 3, captions(3)[:-1])  # 14 captions for 3 images
    problems = lines(run(tmp_path))
    assert len(problems) == 2, problems
    assert 'folder level too deep' in problems[0]
    assert f'{inner}/dev_caps.txt: 15 = 5 x 3 images expected' in problems[1] and '14 found' in problems[1]


def test_a_caption_count_problem_says_what_was_expected_and_found(tmp_path):
    folder = make_layout(tmp_path, 'toy', {'train': 10, 'dev': 2, 'test': 2})
    write_precomp(tmp_path, 'toy', 'train', 10, captions(10)[:-1])
    only_problem(run(tmp_path, 'toy'), f'{folder}/train_caps.txt: 50 = 5 x 10 images expected',
                 'or 10, one each), 49 found', 'take the caption file from the same archive as the features')


def test_the_loader_of_train_and_eval_names_the_layout_mistake_too(tmp_path):
    inner = make_layout(tmp_path / 'f30k_precomp', 'f30k')
    with pytest.raises(UserError) as err:
        load_images(os.path.join(tmp_path, 'f30k_precomp', 'train_ims.npy'))
    assert str(err.value).startswith(f'missing feature file {tmp_path}/f30k_precomp/train_ims.npy: the split files '
                                     f'lie in {inner}: 1 folder level too deep; fix: mv {inner}/*')


def test_one_folder_level_too_shallow(tmp_path):
    make_layout(tmp_path, 'f30k')
    precomp = tmp_path / 'f30k_precomp'
    for name in os.listdir(precomp):
        shutil.move(str(precomp / name), str(tmp_path))
    precomp.rmdir()
    problem = only_problem(run(tmp_path), f'the split files lie directly in {tmp_path}: one folder level too shallow',
                           f'mkdir {precomp} && mv')
    shell(problem.fix)
    assert run(tmp_path).ready


def test_data_path_is_the_precomp_folder_itself(tmp_path):
    folder = make_layout(tmp_path, 'f30k')
    only_problem(run(folder), f'--data_path {folder} is the f30k_precomp folder itself',
                 f'fix: pass --data_path {tmp_path}')


@pytest.mark.parametrize('name', ['flickr30k_precomp', 'Flickr30k', 'f30k'])
def test_misnamed_precomp_folder(tmp_path, name):
    make_layout(tmp_path, 'f30k')
    make_layout(tmp_path, 'coco')  # another dataset, laid out right, is not taken for it
    os.rename(tmp_path / 'f30k_precomp', tmp_path / name)
    problem = only_problem(run(tmp_path), f'the f30k split files lie in {tmp_path / name}: the folder is misnamed',
                           f'fix: mv {tmp_path / name} {tmp_path / "f30k_precomp"}')
    shell(problem.fix.split(' (')[0])
    assert run(tmp_path).ready


@pytest.mark.parametrize('other', ['coco', 'demo'])
def test_another_datasets_folder_is_not_taken_for_a_misnamed_one(tmp_path, other):
    make_layout(tmp_path, other, {'train': 2})
    only_problem(run(tmp_path, 'toy'), f'{tmp_path / "toy_precomp"} holds no split files')


def test_float64_features_are_a_warning_with_the_conversion_fix(tmp_path):
    folder = make_layout(tmp_path, 'f30k')
    np.save(os.path.join(folder, 'dev_ims.npy'), np.ones((3, 4, 8), np.float64))
    report = run(tmp_path)
    assert report.ready  # training reads them (see the next test)
    (warning,) = [f for f in report.findings if f.severity == check_data.WARNING]
    assert warning.what.startswith(f'{folder}/dev_ims.npy holds float64 features')
    assert f'tools/convert_features.py --data_path {tmp_path} --dataset f30k' in warning.fix
    assert '--dtype float32' in warning.fix and '--dtype float16' in warning.fix


@pytest.mark.parametrize('dtype', ['float16', 'float32', 'float64', 'longdouble', 'int32', 'uint8'])
def test_the_checker_accepts_exactly_the_feature_types_training_reads(tmp_path, tokenizer, dtype):
    folder = make_layout(tmp_path, 'f30k')
    np.save(os.path.join(folder, 'dev_ims.npy'), np.ones((3, 4, 8), dtype))
    try:
        np.asarray(PrecompSplit(str(tmp_path), 'f30k', 'dev', tokenizer).images[0], np.float32)
        trains = True
    except UserError as err:
        assert 'region features must be float16, float32 or float64' in str(err)
        trains = False
    assert run(tmp_path).ready == trains == (np.dtype(dtype).name in ('float16', 'float32', 'float64'))


def test_windows_line_ends_are_a_warning_with_its_fix(tmp_path):
    folder = make_layout(tmp_path, 'f30k')
    path = os.path.join(folder, 'test_caps.txt')
    with open(path, 'w', newline='') as f:
        f.write('\r\n'.join(captions(2)) + '\r\n')
    report = run(tmp_path)
    assert report.ready and not report.problems  # read correctly: ready, with the warning
    (warning,) = lines(report, check_data.WARNING)
    assert f'{path} has Windows line ends (CRLF)' in warning
    assert report.datasets[0].splits[2].captions == 10
    shell(warning.split('fix: ')[1].split(' (or')[0])
    assert not run(tmp_path).findings and b'\r' not in open(path, 'rb').read()


@pytest.mark.parametrize('blank_lines', [1, 2])
def test_trailing_blank_line(tmp_path, blank_lines):
    folder = make_layout(tmp_path, 'f30k')
    path = os.path.join(folder, 'train_caps.txt')
    with open(path, 'a') as f:
        f.write('\n' * blank_lines)
    problem = only_problem(run(tmp_path), f'{path} ends with {blank_lines} blank line(s) after its 30 captions')
    with pytest.raises(UserError) as err:  # train.py's loader says the same
        load_captions(path)
    assert str(err.value) == problem.what
    shell(problem.what.split('delete them: ')[1])
    assert run(tmp_path).ready and load_captions(path) == captions(6)


def test_truncated_feature_file(tmp_path):
    folder = make_layout(tmp_path, 'f30k')
    path = os.path.join(folder, 'train_ims.npy')
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size - 100)
    only_problem(run(tmp_path), f'{path} is truncated: {size - 100} of the {size} bytes', 'Unpack it again')


def test_full_scan_finds_nan(tmp_path):
    folder = make_layout(tmp_path, 'f30k')
    images = np.load(os.path.join(folder, 'train_ims.npy'))
    images[4, 1, 2] = np.inf
    np.save(os.path.join(folder, 'train_ims.npy'), images)
    assert run(tmp_path).ready  # the header-only check cannot see values
    report = run(tmp_path, full=True)
    only_problem(report, f'{folder}/train_ims.npy holds NaN or infinite values (image 4)')
    assert [s.finite for s in report.datasets[0].splits] == [False, True, True]


# ----------------------------------------------------------------------------- the text model folder

def bert_copy(folder, files):
    os.makedirs(folder, exist_ok=True)
    for name in files:  # links: the checks look at file names only
        os.symlink(os.path.join(DEMO_TEXT_MODEL, name), os.path.join(folder, name))
    return str(folder)


@pytest.mark.parametrize('missing', ['config.json', 'vocab.txt', 'model.safetensors'])
def test_bert_folder_without_a_needed_file(tmp_path, missing):
    make_layout(tmp_path, 'f30k')
    bert = bert_copy(tmp_path / 'bert', [f for f in ('config.json', 'vocab.txt', 'model.safetensors') if f != missing])
    named = 'weights (model.safetensors or pytorch_model.bin)' if missing == 'model.safetensors' else missing
    only_problem(run(tmp_path, bert=bert), f'text model folder {bert} lacks {named}', 'bert-base-uncased')


def test_bert_weights_are_needed_only_for_pretrained_loading(tmp_path):
    bert = bert_copy(tmp_path / 'bert', ['config.json', 'vocab.txt'])
    check_location(bert)  # a model built from a checkpoint reads config and vocabulary only
    with pytest.raises(UserError, match='lacks weights'):
        check_location(bert, weights=True)


def test_bert_folder_one_level_too_deep(tmp_path):
    make_layout(tmp_path, 'f30k')
    inner = bert_copy(tmp_path / 'bert' / 'bert-base-uncased', ['config.json', 'vocab.txt', 'model.safetensors'])
    only_problem(run(tmp_path, bert=str(tmp_path / 'bert')), f'the model files are in {inner}',
                 f'pass --bert_path {inner}')
    assert run(tmp_path, bert=inner).ready


# ----------------------------------------------------------------------------- progress bars

class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize('tty, enabled, shown', [(True, True, True), (True, False, False), (False, True, False)])
def test_tokenising_progress_only_on_a_terminal_and_when_enabled(tmp_path, tokenizer, monkeypatch, tty, enabled, shown):
    write_precomp(tmp_path, 'toy', 'train', 3, captions(3))
    stream = Terminal() if tty else io.StringIO()
    monkeypatch.setattr('sys.stderr', stream)
    monkeypatch.setattr(progress_lib, 'SHOW_AFTER_S', 0)
    split = PrecompSplit(str(tmp_path), 'toy', 'train', tokenizer, show_progress=enabled)
    assert len(split.tokens) == 15
    assert ('tokenising train captions' in stream.getvalue()) == shown
    assert ('/15' in stream.getvalue()) == shown  # its total: the split's captions
    # the same convention everywhere: tqdm's disable=None (off when not a terminal), on stderr
    bar = progress_lib.progress(range(3), enabled=enabled)
    assert bool(bar.disable) == (not (tty and enabled))
    bar.close()


def test_no_dataset_and_a_hub_name(tmp_path):
    report = check_data.check(str(tmp_path / 'absent'), bert_path='bert-base-uncased')
    assert not report.ready and not report.datasets
    assert lines(report) == [f'--data_path {tmp_path / "absent"} does not exist; fix: unpack the precomp archives '
                             'there (see docs/data.md)']
    (warning,) = lines(report, check_data.WARNING)
    assert 'bert-base-uncased is not a folder: train.py will ask the model hub for it' in warning

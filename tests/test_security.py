"""No pickle execution, and nothing written or deleted outside the run folder."""
import ast
import os

import numpy as np
import pytest
import torch

import eval as eval_script
import train
from lib import checkpoint as ckpt_lib
from lib import run_folder
from lib.errors import UserError
from lib.sims_file import load_sims
from test_errors import REPO, assert_user_error, bert, data, run_main, train_argv  # noqa: F401 (fixtures)


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()',)


# ----------------------------------------------------------------------------- malicious files

@pytest.fixture
def evil_pth(tmp_path):
    marker = tmp_path / 'pwned_pth'
    path = tmp_path / 'evil.pth'
    torch.save({'format': ckpt_lib.FORMAT, 'model': {'img_enc': {'w': torch.zeros(1)}, 'txt_enc': Payload(marker)}},
               path)
    return str(path), marker


@pytest.fixture
def evil_npy(tmp_path):
    marker = tmp_path / 'pwned_npy'
    path = tmp_path / 'results_f30k.npy'
    np.save(path, {'npts': 1, 'sims': Payload(marker)}, allow_pickle=True)
    return str(path), marker


def test_the_payloads_are_real(evil_pth, evil_npy):
    """An unrestricted loader does run them (so the tests below can fail)."""
    for (path, marker), load in ((evil_pth, lambda p: torch.load(p, weights_only=False)),
                                 (evil_npy, lambda p: np.load(p, allow_pickle=True))):
        load(path)
        assert marker.exists()
        marker.unlink()


def test_malicious_checkpoint_is_refused_and_does_not_run(evil_pth, data, bert, capsys):
    path, marker = evil_pth
    expected = f'refusing to load {path}: it references exec, but a checkpoint may only hold tensors'
    with pytest.raises(UserError, match='Nothing from it was run'):
        ckpt_lib.read_checkpoint(path)
    code, err = run_main(eval_script.main, ['--checkpoint', path, '--device', 'cpu'], capsys)
    assert_user_error(code, err, expected, 'Nothing from it was run')
    for option in ('--init_from', '--resume'):
        code, err = run_main(train.main, train_argv(data, bert, 'run', option, path), capsys)
        assert_user_error(code, err, expected)
    assert not marker.exists()


def test_malicious_results_file_is_refused_and_does_not_run(evil_npy, capsys):
    path, marker = evil_npy
    with pytest.raises(UserError, match='not a similarity file this project can read safely'):
        load_sims(path)
    code, err = run_main(eval_script.main, ['--sims', path], capsys)
    assert_user_error(code, err, f'{path} is not a similarity file this project can read safely',
                      'refusing to load builtins.exec')
    assert not marker.exists()


def python_sources():
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', 'runs', 'data', '__pycache__')]
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                with open(path, encoding='utf-8') as f:
                    yield path, ast.parse(f.read(), path)


def module_aliases(tree):
    """Local name -> module for `import torch`, `import torch as T`, `import numpy as np`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
    return names


def calls_to(tree, module, function):
    aliases = module_aliases(tree)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == function
                and isinstance(node.func.value, ast.Name) and aliases.get(node.func.value.id) == module):
            yield node


def keyword(call, name):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else None


LOADERS = {'torch': ('load',), 'numpy': ('load',), 'pickle': ('load', 'loads', 'Unpickler')}


def unsafe_loads(path, tree):
    """Every way a file's code could unpickle without restriction, as 'path:line what'."""
    found = []
    for call in calls_to(tree, 'torch', 'load'):
        if keyword(call, 'weights_only') is not True:
            found.append(f'{path}:{call.lineno} torch.load without weights_only=True')
    for call in calls_to(tree, 'numpy', 'load'):
        if keyword(call, 'allow_pickle') is True:
            found.append(f'{path}:{call.lineno} np.load(allow_pickle=True)')
    for function in ('load', 'loads'):
        found += [f'{path}:{c.lineno} unrestricted pickle.{function}' for c in calls_to(tree, 'pickle', function)]
    # `from torch import load` and the like: the calls above would not see the bare name
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in LOADERS:
            for alias in node.names:
                if alias.name in LOADERS[node.module]:
                    found.append(f'{path}:{node.lineno} from {node.module} import {alias.name}')
    return found


@pytest.mark.parametrize('code', [
    'import torch\ntorch.load("x")',
    'import torch\ntorch.load("x", weights_only=False)',
    'import torch as T\nT.load("x")',
    'from torch import load\nload("x", weights_only=True)',
    'from torch import load as read\nread("x")',
    'import numpy as np\nnp.load("x", allow_pickle=True)',
    'from numpy import load',
    'import pickle\npickle.loads(b"")',
    'from pickle import loads',
    'from pickle import Unpickler',
])
def test_the_scan_catches_every_unrestricted_load(code):
    assert unsafe_loads('snippet.py', ast.parse(code)), code


def test_the_scan_accepts_restricted_loads():
    code = 'import torch\nimport numpy as np\ntorch.load("x", weights_only=True)\nnp.load("x", mmap_mode="r")'
    assert unsafe_loads('snippet.py', ast.parse(code)) == []


def test_every_load_in_the_code_is_restricted():
    sources = list(python_sources())
    assert any(p.endswith(os.path.join('lib', 'checkpoint.py')) for p, _ in sources)
    assert sum(len(list(calls_to(tree, 'torch', 'load'))) for _, tree in sources) >= 1
    problems = [p for path, tree in sources for p in unsafe_loads(path, tree)]
    assert not problems, problems


# ----------------------------------------------------------------------------- the run folder

def fill_old_run(folder):
    """Every file a run writes, plus files of the user's that a run must never touch."""
    os.makedirs(folder / 'sub', exist_ok=True)
    run_names = [run_folder.OPTIONS, run_folder.LOG, run_folder.LAST, run_folder.BEST, run_folder.RESULTS,
                 'events.out.tfevents.1700000000.host.1.0', 'results_tiny.npy', '.checkpoint_last.pth.x1y2.tmp']
    user_names = ['notes.txt', 'options.json.bak', 'model.pth', os.path.join('sub', run_folder.OPTIONS)]
    for name in run_names + user_names:
        (folder / name).write_text(f'old {name}')
    return run_names, user_names


def test_refuses_a_folder_that_holds_another_run(tmp_path):
    folder = tmp_path / 'run'
    fill_old_run(folder)
    with pytest.raises(UserError) as err:
        run_folder.prepare_run_folder(str(folder))
    assert str(err.value) == (f'{folder} already holds a run (options.json); continue it with --resume '
                              f'{folder / "checkpoint_last.pth"}, pick another --logger_name, or pass --overwrite '
                              'to replace it')
    os.unlink(folder / run_folder.LAST)
    with pytest.raises(UserError, match='it has no checkpoint to resume from'):
        run_folder.prepare_run_folder(str(folder))


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    folder = tmp_path / 'run'
    run_names, user_names = fill_old_run(folder)
    run_folder.prepare_run_folder(str(folder), overwrite=True)
    for name in run_names:
        assert not (folder / name).exists(), name
    for name in user_names:
        assert (folder / name).read_text() == f'old {name}', name


def test_resume_keeps_every_file(tmp_path):
    folder = tmp_path / 'run'
    run_names, user_names = fill_old_run(folder)
    run_folder.prepare_run_folder(str(folder), resuming=True, overwrite=True)
    for name in run_names + user_names:
        assert (folder / name).read_text() == f'old {name}', name


def test_refuses_links_empty_names_and_files(tmp_path):
    outside = tmp_path / 'precious.txt'
    outside.write_text('keep me')
    folder = tmp_path / 'run'
    folder.mkdir()
    os.symlink(outside, folder / run_folder.LOG)
    for overwrite in (False, True):
        with pytest.raises(UserError, match=f'{folder / run_folder.LOG} is a symbolic link'):
            run_folder.prepare_run_folder(str(folder), overwrite=overwrite)
    assert outside.read_text() == 'keep me' and os.path.islink(folder / run_folder.LOG)
    with pytest.raises(UserError, match='--logger_name is empty'):
        run_folder.prepare_run_folder('')
    with pytest.raises(UserError, match='is a file, not a folder'):
        run_folder.prepare_run_folder(str(outside))


def snapshot(root):
    """path -> (size, mtime) of every file and folder under root."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_training_and_evaluation_write_only_inside_the_run_folder(data, bert, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / 'cwd'
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    run = tmp_path / 'run'
    _, user_names = fill_old_run(run)
    before = snapshot(tmp_path)
    # a name that wanders through another folder still means <tmp_path>/run
    name = str(tmp_path / 'cwd' / '..' / 'run')
    argv = train_argv(data, bert, 'run', '--logger_name', name, '--overwrite')
    train.main(argv)
    after = snapshot(tmp_path)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed and all(p.split(os.sep)[0] == 'run' for p in changed), sorted(changed)
    for name in user_names:
        assert (run / name).read_text() == f'old {name}'
    assert (run / run_folder.BEST).is_file() and (run / 'results_tiny.npy').is_file()

    before = snapshot(tmp_path)
    eval_script.main(['--checkpoint', str(run / run_folder.BEST), '--device', 'cpu'])
    assert snapshot(tmp_path) == before, 'evaluation writes only what --save_sims / --json name'

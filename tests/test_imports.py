"""No script is used as a library: nothing under tools/ or bench/ imports train.py, eval.py or
search.py, and no library module (lib/, graph_lib.py, arguments.py) imports a script, a tool or a
bench file. What a tool needs from a script belongs in lib/.

Read with ast, not by importing: every import statement counts, also one inside a function
(`def f(): import train`), and `importlib.import_module('train')` / `__import__('train')` with a
constant name."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = {'arguments', 'graph_lib'}  # top-level modules that are libraries, not scripts
SCRIPTS = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py'))} - SHARED
TOOLS = {os.path.basename(p)[:-3] for d in ('tools', 'bench') for p in glob.glob(os.path.join(ROOT, d, '*.py'))}


def files(*folders):
    return sorted(os.path.relpath(p, ROOT) for d in folders for p in glob.glob(os.path.join(ROOT, d, '**', '*.py'),
                                                                             recursive=True))


def imported(path):
    """The top-level names of every module a file imports, anywhere in it."""
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and (
                    getattr(node.func, 'id', None) == '__import__' or getattr(node.func, 'attr', None) == 'import_module'):
            names.add(node.args[0].value)
    return {n.split('.')[0] for n in names} | {n for n in names if n.startswith(('tools.', 'bench.'))}


def test_the_scripts_are_the_top_level_entry_points():
    assert SCRIPTS == {'train', 'eval', 'search'}, 'a new top-level module: a script, or a library for SHARED?'


@pytest.mark.parametrize('path', files('tools', 'bench'))
def test_tools_and_bench_import_no_script(path):
    scripts = imported(path) & SCRIPTS
    assert not scripts, f'{path} imports {sorted(scripts)}: move what it needs into lib/'


@pytest.mark.parametrize('path', files('lib') + ['graph_lib.py', 'arguments.py'])
def test_the_library_imports_no_script_tool_or_bench_file(path):
    names = imported(path)
    assert not names & (SCRIPTS | TOOLS | {'tools', 'bench'}), \
        f'{path} imports {sorted(names & (SCRIPTS | TOOLS | {"tools", "bench"}))}'


def test_the_check_sees_imports_anywhere(tmp_path, monkeypatch):
    """The reader itself: nested, aliased, from-, dotted and dynamic imports are all seen."""
    monkeypatch.setattr(__import__(__name__), 'ROOT', str(tmp_path))
    (tmp_path / 'x.py').write_text('import os\ndef f():\n    import train as t\n'
                                   'class C:\n    from search import thumbnail\n'
                                   'import importlib\nimportlib.import_module("eval")\n__import__("lib.data")\n'
                                   'from tools.plot_curves import main\nfrom . import sibling\n')
    assert imported('x.py') == {'os', 'train', 'search', 'importlib', 'eval', 'lib', 'tools',
                                'tools.plot_curves'}


def test_nothing_here_imports_the_compatibility_module():
    """lib/evaluation.py only re-exports lib/metrics.py, lib/encoding.py and lib/sims_file.py for
    code outside this repository; code here imports those three."""
    def uses(path):
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        return any((isinstance(n, ast.ImportFrom) and (n.module == 'lib.evaluation' or n.module == 'lib' and any(
            a.name == 'evaluation' for a in n.names))) or (isinstance(n, ast.Import) and any(
                a.name == 'lib.evaluation' for a in n.names)) for n in ast.walk(tree))
    paths = files('lib', 'tools', 'bench', 'tests') + [f'{name}.py' for name in SCRIPTS | SHARED]
    assert [p for p in paths if uses(p)] == []

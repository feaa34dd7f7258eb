"""The README and docs/ against the code: relative links and anchors resolve, every `--option` of a
command exists in the script it is given to, the tables that state code facts (dataset profiles,
options a resume may change) equal the code, and every script's --help follows the convention of
arguments.HelpFormatter (help text on every option, its effective default shown exactly once)."""
import argparse
import glob
import importlib
import os
import re
import subprocess

import pytest
import torch

import arguments
import train
from lib.train_options import RESUME_OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, 'README.md')] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))
SCRIPTS = {'train.py': 'train', 'eval.py': 'eval', 'search.py': 'search',
           **{f'{folder}/{os.path.basename(p)}': f'{folder}.{os.path.basename(p)[:-3]}'
              for folder in ('tools', 'bench') for p in sorted(glob.glob(os.path.join(ROOT, folder, '*.py')))}}
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^```[^\n]*\n(.*?)^```', re.S | re.M)
INLINE = re.compile(r'`([^`\n]+)`')
COMMAND = re.compile(r'(?:^|\s)(?:python3?|torchrun(?:\s+(?!\S+\.py)\S+)*)\s+(\S+\.py)\b(.*)')
OPTION = re.compile(r'(?<![\w-])(--[A-Za-z][\w-]*)')


def read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def rel(path):
    return os.path.relpath(path, ROOT)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
    return text.replace(' ', '-')


def anchors(path):
    text = FENCE.sub('', read(path))
    return {slug(h) for h in re.findall(r'^#{1,6}\s+(.*?)\s*$', text, re.M)}


def links(path):
    for target in LINK.findall(FENCE.sub('', read(path))):
        if not re.match(r'[a-z]+:', target):  # http:, https:, mailto:
            yield target


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_relative_links_and_anchors_resolve(page):
    broken = []
    for target in links(page):
        file_part, _, anchor = target.partition('#')
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(path):
            broken.append(f'{target}: no file {rel(path)}')
            continue
        if anchor and path.endswith('.md') and anchor not in anchors(path):
            broken.append(f'{target}: no heading with anchor #{anchor} in {rel(path)}')
    assert not broken, f'{rel(page)}: ' + '; '.join(broken)


def test_the_link_check_sees_a_broken_link_and_anchor(tmp_path, monkeypatch):
    page = tmp_path / 'page.md'
    page.write_text('# Title\n\n[a](missing.md) [b](#title) [c](#nothing) [d](https://example.org)\n')
    with pytest.raises(AssertionError) as err:
        test_relative_links_and_anchors_resolve(str(page))
    assert 'missing.md' in str(err.value) and '#nothing' in str(err.value) and '#title:' not in str(err.value)


# ----------------------------------------------------------------------------- options in commands

class _Captured(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def parser_of(module_name):
    """The argparse parser a script builds: its builder where it has one, otherwise the parser its
    parse function or main builds, caught at its first parse_args call."""
    if module_name == 'train':
        return arguments.get_train_parser()
    module = importlib.import_module(module_name)
    if hasattr(module, 'get_parser'):
        return module.get_parser()
    entry = next(getattr(module, n) for n in ('parse_args', 'parse', 'main') if hasattr(module, n))

    def capture(self, *args, **kwargs):
        raise _Captured(self)
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        entry([])
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f'{module_name} builds no parser')


PARSERS = {}


def options_of(script):
    if script not in PARSERS:
        PARSERS[script] = parser_of(SCRIPTS[script])
    return set(PARSERS[script]._option_string_actions)


def commands(text):
    """(script, options) of every command line in fenced blocks and in inline code spans."""
    lines = [line for block in FENCE.findall(text) for line in block.splitlines()] + INLINE.findall(text)
    for line in lines:
        for part in re.split(r'\s*(?:;|&&|\|\||\|)\s*', line.split(' # ')[0]):
            match = COMMAND.search(part)
            if match:
                yield match.group(1), OPTION.findall(match.group(2).split('$(')[0])


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_every_option_in_a_command_exists_in_its_script(page):
    unknown = []
    for script, options in commands(read(page)):
        if script not in SCRIPTS:
            unknown.append(f'{script} is not a script of this project')
            continue
        unknown += [f'{script} has no {o}' for o in options if o not in options_of(script)]
    assert not unknown, f'{rel(page)}: ' + '; '.join(unknown)


EXTERNAL = ('torchrun', 'tensorboard', 'huggingface-cli')  # spans that are another program's command line


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_every_option_named_in_the_text_exists(page):
    """`--name` in prose and tables (outside commands) is an option of some script of the project."""
    known = set().union(*map(options_of, SCRIPTS))
    unknown = [o for span in INLINE.findall(FENCE.sub('', read(page)))
               if not COMMAND.search(span) and not span.startswith(EXTERNAL)
               for o in OPTION.findall(span) if o not in known]
    assert not unknown, f'{rel(page)}: no script has ' + ', '.join(unknown)


def test_the_command_check_sees_an_unknown_option():
    found = list(commands('```bash\npython train.py --dataset coco --batch_sise 8   # a typo\n'
                          'torchrun --nproc_per_node 2 train.py --devise cpu\n```\n'
                          'and inline: `python tools/check_data.py --data_path d/ --ful`\n'))
    assert found == [('train.py', ['--dataset', '--batch_sise']), ('train.py', ['--devise']),
                     ('tools/check_data.py', ['--data_path', '--ful'])]
    assert '--batch_sise' not in options_of('train.py') and '--ful' not in options_of('tools/check_data.py')


def test_the_pages_hold_commands_for_every_main_script():
    scripts = {s for page in PAGES for s, _ in commands(read(page))}
    assert {'train.py', 'eval.py', 'search.py', 'tools/check_data.py', 'bench/bench.py'} <= scripts


# ----------------------------------------------------------------------------- tables from the code

def marked_block(path, name):
    match = re.search(rf'<!-- {name}:[^>]*-->\n(.*?)\n<!-- /{name} -->', read(path), re.S)
    assert match, f'{rel(path)} has no <!-- {name}: ... --> block'
    return match.group(1)


def profile_table():
    """The profiles table of docs/training.md, as the code defines the profiles."""
    keys = sorted(set().union(*arguments.PROFILES.values()))

    def cell(profile, key):
        if key not in profile:
            return '-'
        if key == 'bert_path':
            return 'MiniLM (`lib.text_model.DEMO_TEXT_MODEL`)'
        value = profile[key]
        return ' '.join(map(str, value)) if isinstance(value, list) else str(value)
    rows = ['| option | f30k | coco | demo (the default `--dataset`) |', '|---|---|---|---|']
    rows += [f'| `--{k}` | ' + ' | '.join(cell(arguments.PROFILES[d], k) for d in ('f30k', 'coco', 'demo')) + ' |'
             for k in keys]
    return '\n'.join(rows)


def test_the_profile_table_is_the_code_s():
    assert set(arguments.PROFILES) == {'f30k', 'coco', 'demo'}, 'a new profile needs a column in the table'
    expected = profile_table()
    assert marked_block(os.path.join(ROOT, 'docs', 'training.md'), 'profiles') == expected, \
        f'docs/training.md: replace the profiles table with\n{expected}'


def test_the_options_a_resume_may_change_are_the_code_s():
    expected = ' '.join(f'`--{k}`' for k in RESUME_OVERRIDES if k != 'resume')
    assert marked_block(os.path.join(ROOT, 'docs', 'training.md'), 'resume-overrides') == expected, \
        f'docs/training.md: replace the list with\n{expected}'


def test_the_dataset_profiles_are_the_authors_commands():
    coco, f30k = arguments.parse_train_args(['--dataset', 'coco']), arguments.parse_train_args(['--dataset', 'f30k'])
    assert (coco.batch_size, coco.mask_weight, coco.trip_cutoff) == (256, 1.5, 1.9)
    assert (f30k.batch_size, f30k.mask_weight, f30k.trip_cutoff) == (128, 1.0, 1.7)
    longer = arguments.parse_train_args(['--dataset', 'coco', '--batch_size', '256', '--mask_weight', '1.5'])
    assert vars(longer) == vars(coco)
    assert arguments.parse_train_args(['--dataset', 'coco', '--batch_size', '8']).batch_size == 8


# ----------------------------------------------------------------------------- --help

def help_defaults(text):
    """{option: the '(default: X)' its help shows, or None} from unwrapped --help output."""
    shown = {}
    for entry in re.split(r'\n(?=  -)', text):
        names = re.findall(r'(?:^|, )(--[\w-]+)', entry.strip().split('  ')[0])
        for name in names:
            found = re.findall(r'\(default: (.*?)\)(?:\n|$)', entry)
            shown[name] = found[0] if found else None
    return shown


def shown_default(value):
    if value is None or value is False or value == [] or value is argparse.SUPPRESS:
        return None
    return ' '.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def train_help(capsys, argv):
    with pytest.raises(SystemExit):
        arguments.parse_train_args(argv + ['--help'])
    return capsys.readouterr().out


@pytest.mark.parametrize('dataset', [None, 'coco', 'f30k', 'mine'])
def test_train_help_shows_the_defaults_of_the_run(capsys, monkeypatch, dataset):
    monkeypatch.setenv('COLUMNS', '1000')  # one line per option: defaults are not wrapped
    argv = ['--dataset', dataset] if dataset else []
    text = train_help(capsys, argv)
    assert text.split('\n\n')[1].startswith('Train HREM.') and '  python train.py' in text  # examples first
    shown = help_defaults(text)
    args = arguments.parse_train_args(argv)
    for action in arguments.get_train_parser()._actions:
        if action.dest in ('help', 'logger_name', 'dataset'):  # dataset: given here, not a default
            continue
        assert shown[action.option_strings[0]] == shown_default(getattr(args, action.dest)), action.dest


def test_train_help_for_the_demo_and_coco(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '1000')
    demo = help_defaults(train_help(capsys, []))
    assert (demo['--embed_size'], demo['--batch_size'], demo['--warmup'], demo['--log_step']) == ('256', '64', '100', '20')
    assert demo['--bert_path'] == arguments.PROFILES['demo']['bert_path']
    coco = help_defaults(train_help(capsys, ['--dataset', 'coco']))
    assert (coco['--trip_cutoff'], coco['--batch_size'], coco['--mask_weight'], coco['--embed_size']) == \
        ('1.9', '256', '1.5', '1024')


@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_every_option_has_help_and_its_default_once(script, monkeypatch):
    monkeypatch.setenv('COLUMNS', '1000')
    options_of(script)
    parser = PARSERS[script]
    assert parser.formatter_class is arguments.HelpFormatter, f'{script}: use arguments.HelpFormatter'
    text = parser.format_help()
    shown = help_defaults(text)
    for action in parser._actions:
        if action.help is argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f'{script} {name}: no help text'
        assert '(default' not in action.help.replace(' (default: %(default)s)', ''), \
            f'{script} {name}: the formatter adds the default; the help text must not'
        if action.option_strings:
            expected = None if action.required else shown_default(action.default)
            assert shown[name] == expected, f'{script} {name}: shows {shown[name]!r}, the default is {expected!r}'
    for line in text.splitlines():
        assert line.count('(default:') <= 1, f'{script}: {line.strip()}'


def test_the_formatter_appends_the_default_exactly_once():
    p = argparse.ArgumentParser(formatter_class=arguments.HelpFormatter)
    p.add_argument('--a', type=int, default=3, help='an a')
    p.add_argument('--b', default=None, help='a b; when not given: the checkpoint\'s')
    p.add_argument('--c', action=argparse.BooleanOptionalAction, default=False, help='a c')
    p.add_argument('--d', action=argparse.BooleanOptionalAction, default=True,
                   help='a d').help += ' (default: %(default)s)'  # as BooleanOptionalAction writes it on 3.9/3.10
    p.add_argument('--e', nargs='+', type=int, default=[15, 25], help='an e of 20%% more')
    p.add_argument('--f', action='store_true', help='an f')
    p.add_argument('--g', required=True, help='a g')
    text = ' '.join(p.format_help().split())
    assert 'an a (default: 3)' in text and "when not given: the checkpoint's --c" in text
    assert 'a c --d' in text and 'a d (default: True)' in text and 'an e of 20% more (default: 15 25)' in text
    assert 'an f --g' in text and text.count('(default:') == 3


# ----------------------------------------------------------------------------- mechanical checks of facts

README = os.path.join(ROOT, 'README.md')
LINE_BUDGET = 1590  # docs/*.md: 1,574 (5f4dd7a) plus the FLOPs, memory, GPU-time and five-seed ablation tables of issues 25 and 27; the README has its own budget
README_BUDGET = 250


def layout_entries(text):
    """{path named in the README's project layout block: the line it is named on}; a bare file name on
    an entry's continuation line (`tools/   check_data.py (...), ...`) belongs to the entry's folder."""
    block = re.search(r'## Project layout\n+```\n(.*?)```', text, re.S)
    assert block, 'README.md has no ``` block under "## Project layout"'
    named, folder = {}, None
    for line in block.group(1).splitlines():
        if line and not line[0].isspace():
            first = line.split()[0]
            folder = first if first.endswith('/') else None  # bare names belong to a folder entry only
            named[first.rstrip('/')] = line
        for name in re.findall(r'(?<![\w/.-])([\w/-]+\.(?:py|sh))\b', line):
            if '/' in name:
                named[name] = line
            elif folder:
                named[folder + name] = line
    return named


def project_files():
    """What the layout must name: the scripts, every module and package of lib/, every file of bench/
    and tools/ (tests/ and docs/ are named as folders)."""
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, '*.py'))}
    for folder in ('lib', 'bench', 'tools'):
        for p in glob.glob(os.path.join(ROOT, folder, '*')):
            name = os.path.basename(p)
            if name.startswith(('_', '.')) or name.endswith(('.json', '.pyc')):
                continue
            if os.path.isdir(p) and not os.path.exists(os.path.join(p, '__init__.py')):
                continue
            files.add(f'{folder}/{name}')
    return files


def test_the_layout_list_names_every_file_and_only_existing_ones():
    named = layout_entries(read(README))
    missing_files = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    unnamed = sorted(f for f in project_files() if f not in named and f.rstrip('/') not in named)
    assert not missing_files, f'README.md layout names files that do not exist: {missing_files}'
    assert not unnamed, f'README.md layout does not name: {unnamed}'


def test_the_layout_check_sees_a_missing_and_an_invented_file():
    named = layout_entries('## Project layout\n\n```\ntrain.py   x\nlib/nothing.py  y (eval.py --z)\n'
                           'tools/     check_data.py (a),\n           plot_curves.py\n```\n')
    assert {'train.py', 'lib/nothing.py', 'tools', 'tools/check_data.py', 'tools/plot_curves.py'} == set(named)
    assert not os.path.exists(os.path.join(ROOT, 'lib/nothing.py'))
    assert 'lib/significance.py' in project_files() and 'bench/ablation_table.py' in project_files()


# files the pages name that are not in this repository, each for its reason
NOT_HERE = {'lib/mca.py': "the authors' code (differences.md)",
            'bench/gpu_check.json': 'the output of bench/gpu_check.sh'}
REPO_PATH = re.compile(r'(?<![\w/.-])((?:lib|tools|bench|tests|docs|imgs|\.ci)/[\w./-]*[\w/])')


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_every_repository_path_named_exists(page):
    missing = {p for p in REPO_PATH.findall(read(page)) if p not in NOT_HERE
               and not os.path.exists(os.path.join(ROOT, p))}
    assert not missing, f'{rel(page)} names files that do not exist: {sorted(missing)}'


def recall_rows(text):
    """(six recalls, rsum) of every table cell written `a b c / d e f, rsum`."""
    for cell in re.findall(r'\|\s*([\d. ]+/[\d. ]+,\s*[\d.]+)\s*(?=\|)', text):
        numbers = [float(x) for x in re.findall(r'\d+(?:\.\d+)?', cell)]
        if len(numbers) == 7:
            yield numbers[:6], numbers[6]


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_every_results_row_s_rsum_is_the_sum_of_its_six_recalls(page):
    wrong = [f'{recalls} sum to {sum(recalls):.1f}, not {rsum}' for recalls, rsum in recall_rows(read(page))
             if abs(sum(recalls) - rsum) > 0.05]
    assert not wrong, f'{rel(page)}: ' + '; '.join(wrong)


def test_the_rsum_check_reads_the_rows():
    rows = list(recall_rows('| x | 86.3 97.6 99.4 / 69.5 91.0 94.4, 538.1 | rsum 534.2 |\n'))
    assert rows == [([86.3, 97.6, 99.4, 69.5, 91.0, 94.4], 538.1)]
    assert any(recall_rows(read(README))), 'the README results table is no longer read'


def machine_ids():
    table = re.search(r'## Machines\n(.*?)\n## ', read(os.path.join(ROOT, 'docs', 'benchmarks.md')), re.S)
    assert table, 'docs/benchmarks.md has no "## Machines" section'
    return set(re.findall(r'^\| (M\d+) \|', table.group(1), re.M))


@pytest.mark.parametrize('page', PAGES, ids=rel)
def test_every_measured_figure_names_a_machine_of_the_table(page):
    """A sentence that says `Measured on` / `Measured:` names its machine (M1, M2, ...) on that line,
    and every machine id used anywhere is a row of the machine table."""
    ids = machine_ids()
    text = FENCE.sub('', read(page))
    unnamed = [line.strip()[:80] for line in text.splitlines()
               if re.search(r'\bMeasured(?: on|:)', line) and not line.startswith('#')
               and not re.search(r'\bM\d+\b', line)]
    unknown = sorted(set(re.findall(r'\b(M\d+)\b', text)) - ids)
    assert not unnamed, f'{rel(page)}: measured figures without a machine id: {unnamed}'
    assert not unknown, f'{rel(page)}: machine ids not in the table of docs/benchmarks.md: {unknown}'


def test_the_machine_table_holds_the_machines_the_figures_came_from():
    assert {'M1', 'M2', 'M3'} <= machine_ids()


def test_the_docs_stay_within_their_line_budget():
    counts = {rel(p): read(p).count('\n') for p in PAGES}
    docs = {page: n for page, n in counts.items() if page.startswith('docs/')}
    assert sum(docs.values()) < LINE_BUDGET, f'{sum(docs.values())} lines of docs/: {docs}'
    assert counts['README.md'] < README_BUDGET


@pytest.mark.parametrize('script', sorted(glob.glob(os.path.join(ROOT, 'bench', '*.sh'))), ids=rel)
def test_every_bench_shell_script_answers_help_and_runs_nothing(script, tmp_path):
    """--help prints the usage and exits 0 without starting Python: a `python` on PATH that leaves a
    trace shows whether anything ran."""
    trace = tmp_path / 'ran'
    fake = tmp_path / 'bin'
    fake.mkdir()
    for name in ('python', 'python3'):
        (fake / name).write_text(f'#!/bin/sh\necho "$@" >> {trace}\n')
        (fake / name).chmod(0o755)
    env = {**os.environ, 'PATH': f'{fake}:{os.environ["PATH"]}', 'PYTHON': str(fake / 'python')}
    for flag in ('--help', '-h'):
        done = subprocess.run(['bash', script, flag], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        assert f'bash bench/{os.path.basename(script)}' in done.stdout
        assert not trace.exists(), f'{rel(script)} {flag} ran: {trace.read_text()}'


def test_bench_device_default_is_the_device_it_uses():
    bench = importlib.import_module('bench.bench')
    assert bench.parse([]).device == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert bench.parse(['--device', 'cpu']).device == 'cpu'

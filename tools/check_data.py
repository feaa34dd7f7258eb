"""Say whether a downloaded dataset is ready to train on, and what to fix when it is not.

    python tools/check_data.py --data_path data/ [--dataset f30k|coco|NAME] [--bert_path DIR] [--full] [--json]

For every split of every <data_path>/<dataset>_precomp/ folder (or of --dataset): images, regions,
feature size and type, captions, captions per image and bytes on disk, read from the .npy header
and the caption file (seconds, whatever the size; --full also scans the features for NaN/inf).
Flickr30K and COCO are compared with their standard split sizes. The checks are the ones train.py
and eval.py run at start-up (lib/data.py, lib/text_model.py), plus the usual unpacking mistakes.
Exit status: 0 when ready to train, 1 when not (one line per problem, with its fix).
"""
import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arguments  # noqa: E402
from lib.data import (DATASET_ALIASES, DEV_CAPTION_CAP, PRECOMP_SUFFIX, captions_per_image,  # noqa: E402
                      check_caption_lines, check_feature_sizes, find_nonfinite, layout_mistake, load_images,
                      nonfinite_error, precomp_folder, read_caption_lines, split_paths, splits_in)
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.text_model import WEIGHT_FILES, check_location  # noqa: E402

# Images per split of the SCAN precomp copies; five captions per image.
STANDARD_SIZES = {
    'f30k': {'train': 29000, 'dev': 1014, 'test': 1000},
    'coco': {'train': 113287, 'dev': 5000, 'test': 1000, 'testall': 5000},
}
STANDARD_PER_IMAGE = 5
# Smaller training files stay in the page cache of any machine: no advice about it.
PAGE_CACHE_ADVICE_BYTES = 1e9
PROBLEM, WARNING = 'problem', 'warning'
READY_EXIT, NOT_READY_EXIT = 0, 1


@dataclass
class Finding:
    what: str  # a UserError's message already holds its fix
    fix: str = ''
    severity: str = PROBLEM

    def line(self):
        return self.what + (f'; fix: {self.fix}' if self.fix else '')


@dataclass
class SplitInfo:
    name: str
    ims_path: str
    caps_path: str
    images: int = None
    regions: int = None
    feature_size: int = None
    dtype: str = None
    bytes: int = None
    captions: int = None
    per_image: int = None
    standard_images: int = None
    finite: bool = None  # None: not scanned (--full scans)


@dataclass
class DatasetReport:
    name: str
    folder: str
    splits: list = field(default_factory=list)
    findings: list = field(default_factory=list)


def size_text(n):
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= scale / 10:
            return f'{n / scale:.1f} {unit}'
    return f'{n} B'


def has_windows_line_ends(path):
    with open(path, 'rb') as f:
        return f.readline().endswith(b'\r\n')


def float64_fix(data_path, dataset):
    convert = f'python tools/convert_features.py --data_path {data_path} --dataset {dataset} --out NEW_FOLDER'
    return f'convert to float32 ({convert} --dtype float32), or to float16, half again ({convert} --dtype float16)'


def check_split(folder, name, full, convert_fix):
    info = SplitInfo(name, *split_paths(folder, name))
    findings = []
    if not os.path.isfile(info.ims_path) or not os.path.isfile(info.caps_path):
        present, absent = ((info.ims_path, info.caps_path) if os.path.isfile(info.ims_path)
                           else (info.caps_path, info.ims_path))
        findings.append(Finding(f'split {name}: {present} has no {os.path.basename(absent)} beside it (a partial '
                                'unpack)', f'extract {os.path.basename(absent)} from the archive into '
                                f'{os.path.dirname(absent)}'))
    if os.path.isfile(info.ims_path):
        try:
            images = load_images(info.ims_path)  # the loader's own checks: header, size, shape, type
            info.images, info.regions, info.feature_size = images.shape
            info.dtype, info.bytes = str(images.dtype), os.path.getsize(info.ims_path)
            if images.dtype.itemsize > 4:  # readable (FEATURE_DTYPES), only wasteful
                findings.append(Finding(f'{info.ims_path} holds {images.dtype} features: {images.dtype.itemsize // 4} '
                                        'times the disk space and page cache of float32 for no gain (the model '
                                        'computes in float32)', convert_fix, WARNING))
            if full:
                bad = find_nonfinite(images, show_progress=True, desc=f'scanning {os.path.basename(info.ims_path)}')
                info.finite = bad is None
                if bad is not None:
                    findings.append(Finding(str(nonfinite_error(info.ims_path, bad))))
        except UserError as err:
            findings.append(Finding(str(err)))
    if os.path.isfile(info.caps_path):
        try:
            lines = read_caption_lines(info.caps_path)
            info.captions = sum(1 for c in lines if c)
            check_caption_lines(info.caps_path, lines)
        except UserError as err:
            findings.append(Finding(str(err)))
        if has_windows_line_ends(info.caps_path):
            findings.append(Finding(f'{info.caps_path} has Windows line ends (CRLF): this project reads them '
                                    'correctly, but tools that split lines on \\n keep a \\r in every caption',
                                    f"sed -i 's/\\r$//' {info.caps_path} (or dos2unix)", WARNING))
    if info.images and info.captions:
        try:
            info.per_image = captions_per_image(info.images, info.captions, info.caps_path, info.ims_path)
        except UserError as err:
            findings.append(Finding(str(err)))
    return info, findings


def compare_with_standard(report, standard):
    """Missing, partial and wrongly captioned splits of a dataset with known sizes."""
    by_name = {s.name: s for s in report.splits}
    for name, n_images in standard.items():
        info = by_name.get(name)
        if info is None:
            extra = (': the field reports COCO on the 5000-image testall split (5K, and its 1K folds), and '
                     "train.py's final test uses it" if name == 'testall' else '')
            report.findings.append(Finding(
                f'{report.folder} has no {name} split ({n_images} images expected){extra}',
                f'unpack {name}_ims.npy and {name}_caps.txt from the {report.name} precomp archive into '
                f'{report.folder}'))
            continue
        info.standard_images = n_images
        if info.images is not None and info.images != n_images:
            report.findings.append(Finding(
                f'{info.ims_path} has {info.images} images; the standard {report.name} {name} split has {n_images}',
                'a partial or different copy: download and unpack it again (see docs/data.md)'))
        elif info.per_image is not None and info.captions != STANDARD_PER_IMAGE * n_images:  # else reported
            report.findings.append(Finding(
                f'{info.caps_path}: {STANDARD_PER_IMAGE * n_images} = {STANDARD_PER_IMAGE} x {n_images} images '
                f'expected for the standard {report.name} {name} split, {info.captions} found',
                'take the caption file from the same archive as the features'))


def check_dataset(data_path, dataset, full=False, standard=None):
    report = DatasetReport(dataset, precomp_folder(data_path, dataset))
    folder = report.folder
    mistake = layout_mistake(data_path, dataset)
    if mistake:
        report.findings.append(Finding(mistake.what, mistake.fix))
        folder = mistake.folder  # check the files where they lie: one run reports every problem
    names = splits_in(folder)
    if not names:
        report.findings.append(Finding(f'{report.folder} holds no split files (<split>_ims.npy, <split>_caps.txt)',
                                       'unpack the precomp archive so that its files sit there (see docs/data.md)'))
        return report
    expected = list(standard or ())
    for name in expected + sorted(names - set(expected)):
        if name in names:
            info, findings = check_split(folder, name, full, float64_fix(data_path, dataset))
            report.splits.append(info)
            report.findings += findings
    if standard is not None:
        compare_with_standard(report, standard)
    else:
        needed = ('train', arguments.get_train_parser().get_default('val_split'), arguments.test_split_of(dataset))
        for name in needed:
            if name not in names:
                report.findings.append(Finding(
                    f'{report.folder} has no {name} split; train.py reads {", ".join(needed)} (training, model '
                    'selection with --val_split, final test)', f'add {name}_ims.npy and {name}_caps.txt'))
    try:
        check_feature_sizes([s for s in report.splits if s.feature_size is not None])
    except UserError as err:
        report.findings.append(Finding(str(err)))
    return report


def find_datasets(data_path):
    """The datasets of data_path: its <name>_precomp folders, and Flickr30K / COCO where an
    unpacking mistake put them."""
    names = set()
    if os.path.isdir(data_path):
        names = {n[:-len(PRECOMP_SUFFIX)] for n in os.listdir(data_path)
                 if n.endswith(PRECOMP_SUFFIX) and os.path.isdir(os.path.join(data_path, n))}
    base = os.path.basename(os.path.normpath(data_path))
    if base.endswith(PRECOMP_SUFFIX):  # --data_path names a precomp folder itself
        names.add(base[:-len(PRECOMP_SUFFIX)])
    names |= {d for d in DATASET_ALIASES if layout_mistake(data_path, d, unnamed=False)}
    return sorted(names)


def check_bert(bert_path):
    try:
        check_location(bert_path, weights=True)
    except UserError as err:
        return [Finding(str(err))]
    if not os.path.isdir(bert_path):
        return [Finding(f'text model {bert_path} is not a folder: train.py will ask the model hub for it at start '
                        '(network access needed)', f'for offline runs download bert-base-uncased into a folder, e.g. '
                        'huggingface-cli download bert-base-uncased --local-dir data/bert-base-uncased, and pass '
                        'it with --bert_path', WARNING)]
    return []


def total_memory():
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):  # not every system reports it
        return None


def run_needs(report):
    """What a training run of this dataset will need and use, as lines."""
    by_name = {s.name: s for s in report.splits}
    lines = []
    train = by_name.get('train')
    if train is not None and train.bytes and train.bytes >= PAGE_CACHE_ADVICE_BYTES:
        memory = total_memory()
        line = (f'page cache: train_ims.npy ({size_text(train.bytes)}) is read in random order every epoch; '
                f'keep {size_text(train.bytes)} of RAM free to hold it')
        if memory:
            fits = 'it fits' if train.bytes < memory else 'it does not fit: every epoch reads from disk'
            line += f' (this machine has {size_text(memory)}: {fits})'
        if train.dtype == 'float16':
            line += '; the features are float16 already'
        else:
            half = train.images * train.regions * train.feature_size * 2
            line += f'; float16 files (tools/convert_features.py --dtype float16) would need {size_text(half)}'
        lines.append(line)
    dev = by_name.get('dev')
    if dev is not None and dev.images and dev.per_image:
        used = min(dev.images, DEV_CAPTION_CAP // dev.per_image)
        lines.append(f'model selection: dev, its first {used * dev.per_image} captions ({used} of {dev.images} '
                     'images), after every epoch (--val_split)')
    test_name = arguments.test_split_of(report.name)
    test = by_name.get(test_name)
    if test is not None and test.images:
        folds = (' (eval.py --fold5 adds the five 1000-image folds)'
                 if report.name == 'coco' and test.images == 5000 else '')
        lines.append(f'final test: {test_name}, {test.images} images with model_best.pth{folds}')
    return lines


@dataclass
class Report:
    data_path: str
    datasets: list
    bert_path: str
    bert_findings: list
    data_findings: list = field(default_factory=list)

    @property
    def findings(self):
        return self.data_findings + [f for d in self.datasets for f in d.findings] + self.bert_findings

    @property
    def problems(self):
        return [f for f in self.findings if f.severity == PROBLEM]

    @property
    def ready(self):
        return not self.problems

    def as_dict(self):
        return {'ready': self.ready, 'data_path': self.data_path, 'bert_path': self.bert_path,
                'datasets': [{**asdict(d), 'needs': run_needs(d)} for d in self.datasets],
                'bert_findings': [asdict(f) for f in self.bert_findings],
                'problems': [f.line() for f in self.problems],
                'warnings': [f.line() for f in self.findings if f.severity == WARNING]}


def check(data_path, dataset=None, bert_path=None, full=False, standard_sizes=None):
    """The Report of data_path (every dataset found, or dataset) and the text model; standard_sizes
    ({dataset: {split: images}}) defaults to STANDARD_SIZES."""
    standard_sizes = STANDARD_SIZES if standard_sizes is None else standard_sizes
    datasets = [dataset] if dataset else find_datasets(data_path)
    reports = [check_dataset(data_path, d, full, standard_sizes.get(d)) for d in datasets]
    if bert_path is None:
        bert_path = arguments.get_train_parser(dataset).get_default('bert_path')
    missing = []
    if not reports:
        shallow = layout_mistake(data_path, 'NAME')  # split files in data_path itself
        missing = [Finding(shallow.what, f"{shallow.fix} (NAME: f30k, coco or your dataset's name)") if shallow else
                   Finding(f'no <dataset>_precomp folder in {data_path}' if os.path.isdir(data_path) else
                           f'--data_path {data_path} does not exist',
                           'unpack the precomp archives there (see docs/data.md)')]
    return Report(data_path, reports, bert_path, check_bert(bert_path), missing)


def table(report):
    head = ('split', 'images', 'regions', 'feature', 'dtype', 'captions', 'per image', 'on disk', 'standard', 'finite')
    rows = [head]
    for s in report.splits:
        cells = (s.name, s.images, s.regions, s.feature_size, s.dtype, s.captions, s.per_image,
                 size_text(s.bytes) if s.bytes is not None else None, s.standard_images,
                 {True: 'yes', False: 'NO'}.get(s.finite))
        rows.append(tuple('-' if c is None else str(c) for c in cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def print_report(report):
    for d in report.datasets:
        print(f'{d.name}: {d.folder}')
        if d.splits:
            print('\n'.join('  ' + line for line in table(d)))
        needs = run_needs(d)
        if needs:
            print('  a training run will need and use:')
            print('\n'.join(f'    - {line}' for line in needs))
        print()
    present = [f for f in ('config.json', 'vocab.txt') + WEIGHT_FILES
               if os.path.isfile(os.path.join(report.bert_path, f))]
    print(f'text model: {report.bert_path}' + (f' ({", ".join(present)})' if present else ''))
    warnings = [f for f in report.findings if f.severity == WARNING]
    for f in warnings:
        print(f'warning: {f.line()}')
    if report.ready:
        print('verdict: ready to train' + (f' ({len(warnings)} warning(s) above)' if warnings else ''))
        return
    print(f'verdict: NOT ready to train, {len(report.problems)} problem(s):')
    for f in report.problems:
        print(f'  - {f.line()}')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    p.add_argument('--data_path', default='data/', help='folder that holds <dataset>_precomp/')
    p.add_argument('--dataset', default=None, help='f30k, coco or NAME; when not given: every <NAME>_precomp found')
    p.add_argument('--bert_path', default=None, help="text model folder; when not given: train.py's default for the dataset")
    p.add_argument('--full', action='store_true', help='also scan every feature file for NaN/inf (reads it all)')
    p.add_argument('--json', action='store_true', help='print the report as JSON instead of the table')
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    opts = parse_args(argv)
    report = check(opts.data_path, opts.dataset, opts.bert_path, opts.full)
    if opts.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print_report(report)
    sys.exit(READY_EXIT if report.ready else NOT_READY_EXIT)


if __name__ == '__main__':
    main()

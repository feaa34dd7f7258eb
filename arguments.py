"""Every option of training and evaluation, in one place, with the authors' defaults.

`python train.py` with no arguments selects the built-in demo (`--dataset demo`), whose profile
changes a handful of defaults so that it trains in minutes on a laptop CPU; `--dataset f30k` and
`--dataset coco` select the authors' settings for those datasets (see PROFILES). Options given on
the command line always win over a profile, and `train.py [--dataset NAME] --help` shows the
defaults of that dataset's profile.

Help convention, for every parser of the project (train.py, eval.py, search.py, tools/*.py,
bench/bench.py): build it with `formatter_class=arguments.HelpFormatter`, give every option a help
string, and never write '(default: ...)' into a help string: HelpFormatter appends
' (default: X)' once, from the option's real default, and leaves it out where the default is None,
False, empty or suppressed. An option whose default is None says in its help what happens when it
is not given ('...; when not given: the checkpoint's').
"""
import argparse
import json
import os
import sys

from lib.errors import UserError
from lib.text_model import DEMO_TEXT_MODEL

# Per-dataset defaults over the global ones below. f30k/coco: the authors' training commands
# (batch size, mask weight) and the triplet cut-off their code switches on the dataset name.
PROFILES = {
    'f30k': {'trip_cutoff': 1.7, 'batch_size': 128, 'mask_weight': 1.0},
    'coco': {'trip_cutoff': 1.9, 'batch_size': 256, 'mask_weight': 1.5},
    'demo': {
        'trip_cutoff': 1.7,
        'bert_path': DEMO_TEXT_MODEL,
        'embed_size': 256,
        'batch_size': 64,
        'num_epochs': 3,
        'lr_schedules': [2],
        'warmup': 100,
        'workers': 0,
        'log_step': 20,
    },
}


# Per-model defaults over the dataset profile, by dataset ('*': any dataset without its own entry).
# HREM has none: the global defaults and PROFILES are its authors' settings. VSE∞: its authors'
# commands (woodfrog/vse_infty), 25 epochs with lr x 0.1 after epoch 15 and batch 128 on Flickr30K
# and COCO alike; the demo keeps its own sizes and schedule.
MODEL_PROFILES = {
    'vse_infty': {
        '*': {'num_epochs': 25, 'lr_schedules': [15], 'batch_size': 128},
        'demo': {},
    },
}


def profile_defaults(dataset=None, model=None):
    """The defaults that --dataset and --model change: the dataset's profile, then the model's."""
    per_model = MODEL_PROFILES.get(model, {})
    return {**PROFILES.get(dataset, {}), **per_model.get(dataset, per_model.get('*', {}))}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description kept as written (examples stay on their lines); every option's help ends with
    ' (default: X)' exactly once, unless the default is None, False, empty or suppressed."""

    def _get_help_string(self, action):
        # BooleanOptionalAction of Python 3.9/3.10 appends its own default to the help; keep only ours
        text = (action.help or '').replace(' (default: %(default)s)', '')
        default = action.default
        if action.required or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS:
            return text
        if isinstance(default, (list, tuple)):
            default = ' '.join(map(str, default))
        return f'{text} (default: {str(default).replace("%", "%%")})'


def bounded_float(low, high, low_open=True):
    def parse(text):
        value = float(text)
        ok = (low < value if low_open else low <= value) and value <= high
        if not ok:
            bracket = '(' if low_open else '['
            raise argparse.ArgumentTypeError(f'{value} is outside {bracket}{low}, {high}]')
        return value
    return parse


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} must be >= 1')
    return value


# ----------------------------------------------------------------------------- shared options
# Options that several scripts take (train.py, eval.py, search.py, tools/*.py, bench/*.py), defined
# once so that their name, default and meaning agree everywhere.

PRECISIONS = ('fp32', 'bf16', 'fp16')


def add_device_arg(parser):
    """--device, default None: lib.distributed.pick_device takes CUDA when present, else the CPU."""
    return parser.add_argument('--device', default=None,
                               help='cuda, cuda:N or cpu; when not given: cuda when present, else cpu')


def add_split_arg(parser, what='split to evaluate'):
    """--split of a dataset's split to read, default None: test_split_of(dataset)."""
    return parser.add_argument('--split', default=None,
                               help=f"{what}; when not given: the dataset's test split (COCO: testall)")


def add_precision_arg(parser):
    return parser.add_argument('--precision', default='fp32', choices=PRECISIONS,
                               help='autocast precision of the encoders; losses and ranking stay in fp32')


def add_tf32_arg(parser):
    return parser.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=False,
                               help='CUDA only: fp32 matrix products in TF32 (faster on Ampere+, results change '
                                    'slightly; docs/precision_and_speed.md)')


def add_data_args(parser):
    g = parser.add_argument_group('data')
    g.add_argument('--data_path', default='data/', help='folder that holds <dataset>_precomp/')
    g.add_argument('--dataset', default='demo',
                   help='f30k, coco, demo (built-in synthetic set) or any <name> with data/<name>_precomp; '
                        'f30k, coco and demo select a profile of defaults (docs/training.md)')
    g.add_argument('--bert_path', default='data/bert-base-uncased',
                   help='text model: a local folder (config.json, vocab.txt, weights) or a hub name')
    g.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='DataLoader worker processes for training')
    add_cache_arg(g)
    return g


def add_cache_arg(group):
    group.add_argument('--cache_dir', default=None,
                       help='folder of the token cache (tokenised captions of splits of 20,000 captions or more, '
                            're-tokenised only when the caption file or the tokenizer changes); by default '
                            '$XDG_CACHE_HOME/hrem/tokens or ~/.cache/hrem/tokens; none: no cache')


def add_model_args(parser):
    from lib.models import model_names
    g = parser.add_argument_group('model (fragment-level relations)')
    g.add_argument('--model', default='hrem', choices=model_names(),
                   help='the model to train (lib/models; docs/adding_a_model.md)')
    g.add_argument('--embed_size', type=positive_int, default=1024, help='joint embedding size E')
    g.add_argument('--residual_weight', type=float, default=0.8,
                   help='g = w * MaxK(x) + (1 - w) * mean(Transformer(x))')
    g.add_argument('--nhead', type=positive_int, default=16, help='attention heads of every Transformer layer')
    g.add_argument('--dropout', type=float, default=0.1, help='dropout of every Transformer layer')
    g.add_argument('--mlp_last_bn', type=int, default=0, choices=[0, 1],
                   help='apply BatchNorm after the last MLP layer of the image encoder. The authors '
                        'create that layer but never apply it; 0 reproduces their released checkpoints')
    return g


def add_relation_args(parser):
    g = parser.add_argument_group('instance-level relations (training only)')
    g.add_argument('--warmup', type=int, default=8000,
                   help='optimizer steps with the base loss only, before the relation module starts')
    g.add_argument('--num_layers_enc', type=positive_int, default=1, help='layers of the instance Transformer')
    g.add_argument('--graph_lr_factor', type=float, default=1.0, help='lr factor of the relation module')
    g.add_argument('--mask_weight', type=float, default=1.0, help='scale of the relevance added to attention')
    g.add_argument('--threshold', type=bounded_float(0.0, 1.0), default=0.5,
                   help='proportion of the batch each node connects to, in (0, 1]')
    g.add_argument('--topk', type=positive_int, default=10, help='K region-word scores fed to the relevance MLP')
    g.add_argument('--reg_loss_weight', type=float, default=10.0, help='weight of the KL regulariser')
    g.add_argument('--sigma', type=float, default=1.0, help='relevance exp(-distance / sigma)')
    g.add_argument('--norm_input', type=int, default=1, choices=[0, 1],
                   help='the instance Transformer takes the L2-normalised embeddings (1) or the embeddings '
                        'before normalisation (0); relations are computed from the normalised ones either way')
    return g


def add_ablation_args(parser):
    g = parser.add_argument_group(
        'ablations (the full model is the default; see also --reg_loss_weight 0, --threshold, --topk, '
        '--mask_weight)')
    g.add_argument('--instance_relation', type=int, default=1, choices=[0, 1],
                   help='0: the fragment-level model alone; no relation module is built, the loss is l(v, t)')
    g.add_argument('--connection_relation', type=int, default=1, choices=[0, 1],
                   help='0: no connection relation, every node attends to every node')
    g.add_argument('--relevance_relation', type=int, default=1, choices=[0, 1],
                   help='0: no relevance relation, connected pairs get an equal attention bias (0); the '
                        'relevance MLPs and the regulariser that constrains them are not built')
    g.add_argument('--cross_loss', type=int, default=1, choices=[0, 1],
                   help='1: l(v, t) + l(v, t^) + l(v^, t) + l(v^, t^); 0: without the cross terms, '
                        'l(v, t) + l(v^, t^) (plus the regulariser)')
    g.add_argument('--fragment_transformer', default='both', choices=['both', 'image', 'text', 'none'],
                   help='encoders that have the fragment-level Transformer; the others pool with MaxK alone')
    return g


def add_loss_args(parser):
    g = parser.add_argument_group('objective')
    g.add_argument('--base_loss', default='trip', choices=['trip', 'vse'], help='loss on (v, t)')
    g.add_argument('--gnn_loss', default='trip', choices=['trip', 'vse'], help='loss on the enhanced pairs')
    g.add_argument('--margin', type=float, default=0.2,
                   help="hinge margin of both losses (the authors' trip loss always uses 0.2)")
    g.add_argument('--trip_cutoff', type=float, default=1.7,
                   help='distance-weighted sampling ignores negatives at distance >= cutoff; the authors '
                        'use 1.7 on Flickr30K, 1.9 on COCO (the f30k and coco profiles)')
    g.add_argument('--vse_mean_warmup_epochs', type=int, default=1,
                   help='vse loss sums over all negatives for these epochs, then takes the hardest')
    g.add_argument('--max_violation', action='store_true',
                   help='vse loss uses the hardest negative from the first epoch on')
    return g


def add_optim_args(parser):
    g = parser.add_argument_group('optimisation')
    g.add_argument('--num_epochs', type=positive_int, default=30, help='epochs to train')
    g.add_argument('--batch_size', type=int, default=128, help='global batch size (pairs per step)')
    g.add_argument('--learning_rate', type=float, default=5e-4, help='AdamW learning rate')
    g.add_argument('--weight_decay', type=float, default=1e-4, help='AdamW weight decay')
    g.add_argument('--bert_lr_factor', type=float, default=0.1, help='lr factor of the BERT backbone')
    g.add_argument('--grad_clip', type=float, default=2.0, help='gradient-norm clip (0 disables)')
    g.add_argument('--lr_schedules', type=int, nargs='+', default=[15, 25], help='epochs where lr decays')
    g.add_argument('--decay_rate', type=float, default=0.1, help='lr factor at each scheduled epoch')
    g.add_argument('--size_augment', type=int, default=1, choices=[0, 1], help='drop 20%% of regions')
    g.add_argument('--text_augment', type=int, default=1, choices=[0, 1], help='mask/replace/delete 20%% of words')
    g.add_argument('--max_steps', type=int, default=0, help='stop after this many optimizer steps (0: no limit)')
    g.add_argument('--max_nonfinite', type=int, default=5,
                   help='abort after this many consecutive non-finite losses (each one skips its step)')
    return g


def add_runtime_args(parser):
    g = parser.add_argument_group('runtime')
    add_device_arg(g)
    add_precision_arg(g)
    g.add_argument('--seed', type=int, default=0, help='seed of every random choice (a CPU run repeats exactly)')
    add_tf32_arg(g)
    g.add_argument('--compile', action=argparse.BooleanOptionalAction, default=False,
                   help='torch.compile the image and text encoders (needs a C++ compiler on CPU, Triton on CUDA)')
    g.add_argument('--grad_checkpointing', action=argparse.BooleanOptionalAction, default=False,
                   help='recompute the text backbone in the backward pass instead of keeping its activations: '
                        'the same gradients, less memory, a slower step (docs/precision_and_speed.md)')
    return g


TRAIN_EXAMPLES = """Train HREM. The defaults shown are those of the dataset given (the demo when none).

  python train.py                                          # the built-in demo, minutes on a CPU
  python train.py --dataset f30k --data_path data/         # the authors' Flickr30K command
  python train.py --dataset coco --data_path data/         # the authors' COCO command
  python train.py --resume runs/coco/checkpoint_last.pth   # continue a run
  torchrun --nproc_per_node 4 train.py --dataset coco --data_path data/
  python train.py --config runs/coco/options.json --logger_name runs/coco_again   # replay a run
"""


def get_train_parser(profile=None, add_help=True, model=None):
    """The training options with the global defaults, or with those of dataset `profile` and
    `model` (profile_defaults)."""
    parser = argparse.ArgumentParser(description=TRAIN_EXAMPLES, formatter_class=HelpFormatter,
                                     add_help=add_help)
    add_data_args(parser)
    add_model_args(parser)
    add_relation_args(parser)
    add_ablation_args(parser)
    add_loss_args(parser)
    add_optim_args(parser)
    add_runtime_args(parser)
    g = parser.add_argument_group('run')
    g.add_argument('--logger_name', default=None, help='run folder; when not given: runs/<dataset>')
    g.add_argument('--log_step', type=int, default=200, help='steps between lines of the text log')
    g.add_argument('--val_split', default='dev',
                   help="split for model selection (dev: its first 5000 captions); the authors select on "
                        "'test' (Flickr30K) or 'testall' (COCO)")
    g.add_argument('--resume', default=None, help='checkpoint_last.pth of a run to continue exactly (see docs/training.md)')
    g.add_argument('--checkpoint_every', type=int, default=0,
                   help='also write checkpoint_last.pth every N optimizer steps inside an epoch (0: off)')
    g.add_argument('--checkpoint_minutes', type=float, default=30,
                   help='also write checkpoint_last.pth inside an epoch when this many minutes passed since '
                        'the last save (0: off): a job killed without warning loses at most that much')
    g.add_argument('--init_from', default=None,
                   help="start from the encoder weights of a checkpoint (ours or the authors'); "
                        'relation module, optimizer and schedule start fresh')
    g.add_argument('--overwrite', action='store_true', help='reuse a run folder that holds another run')
    g.add_argument('--config', default=None,
                   help='options from a file: the options.json of a run (replays it) or any JSON / YAML '
                        '(.yaml, .yml) mapping of option names to values. Precedence: the dataset profile\'s '
                        'defaults < the file < the command line. Not replayed from a file: '
                        + ', '.join(RUN_LOCAL) + ' (where and how this invocation runs, not what it '
                        'computes; give them on the command line)')
    g.add_argument('--eval_batch_size', type=int, default=128, help='batch size of encoding at evaluation')
    parser.set_defaults(**profile_defaults(profile, model))
    return parser


# options.json keys that a --config file does not set: they say where and how one invocation runs
# (its run folder, device, continuing or overwriting a run), not what the run computes.
RUN_LOCAL = ('config', 'resume', 'overwrite', 'logger_name', 'device')


def read_config(path):
    """The {option: value} mapping of a --config file: JSON, or YAML (.yaml/.yml) with pyyaml."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except OSError as err:
        raise UserError(f'--config {path}: {err.strerror or err}') from err
    if path.lower().endswith(('.yaml', '.yml')):
        try:
            import yaml
        except ImportError as err:
            raise UserError(f'{path} is YAML: install pyyaml (pip install "pyyaml>=6") or give the options '
                            'as JSON') from err
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UserError(f'{path} is not valid YAML: {" ".join(str(err).split())}') from err
    else:
        try:
            values = json.loads(text)
        except ValueError as err:
            raise UserError(f'{path} is not valid JSON ({err}); give a JSON or YAML (.yaml) file') from err
    if not isinstance(values, dict):
        raise UserError(f'{path} holds a {type(values).__name__}; expected a mapping of option names to '
                        'values, as the options.json of a run')
    return values


def config_argv(path, values):
    """A --config file's options as command-line words, before the real command line so that it
    wins; argparse checks their types and choices as it checks typed ones."""
    parser = get_train_parser(add_help=False)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(k for k in values if k not in actions and k not in RUN_LOCAL)
    if unknown:
        raise UserError(f'{path}: unknown option {unknown[0]!r}' + (f' (and {len(unknown) - 1} more)' if
                        len(unknown) > 1 else '') + '; see `python train.py --help` for the option names')
    argv = []
    for key, value in values.items():
        if key in RUN_LOCAL or value is None:  # None: the option's default (it has no other spelling)
            continue
        action, flag = actions[key], actions[key].option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f'--no-{flag[2:]}')
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    check = get_train_parser(add_help=False)
    check.exit_on_error = False  # a wrong value names the file, not only the option
    try:
        check.parse_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(f'{path}: {err}') from err
    return argv


def with_config(argv):
    """argv with the options of its --config file (if any) put in front of it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    known, _ = get_train_parser(add_help=False).parse_known_args(argv)
    if not known.config:
        return argv
    return config_argv(known.config, read_config(known.config)) + argv


def profile_of(argv=None):
    """(--dataset, --model) of an argument list, read before --help so that help shows their profile."""
    known, _ = get_train_parser(add_help=False).parse_known_args(argv)
    return known.dataset, getattr(known, 'model', None)


def dataset_of(argv=None):
    return profile_of(argv)[0]


def parse_train_args(argv=None):
    """Parse with the dataset's and the model's profiles applied to the defaults, then a --config
    file's options, then the command line's."""
    argv = with_config(argv)
    dataset, model = profile_of(argv)
    args = get_train_parser(dataset, model=model).parse_args(argv)
    if args.logger_name is None:
        args.logger_name = os.path.join('runs', args.dataset)
    return args


def test_split_of(dataset):
    """The split the field reports on: COCO's 5000-image testall, otherwise test."""
    return 'testall' if dataset == 'coco' else 'test'

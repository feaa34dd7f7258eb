"""Building a model from a checkpoint (ours or the authors') for evaluation and search."""
import arguments
from lib import checkpoint as ckpt_lib
from lib.errors import UserError
from lib.model import HREM
from lib.text_model import load_text_backbone, load_tokenizer


def checkpoint_args(ckpt):
    """The training options of a checkpoint over our defaults: the authors' opt supplies what it
    has (embedding size, residual weight, heads, ...), anything we added takes its default."""
    args = arguments.get_train_parser().parse_args([])
    for key, value in ckpt['args'].items():
        if hasattr(args, key):
            setattr(args, key, value)
    args.embed_size = ckpt_lib.architecture(ckpt)['embed_size']
    return args


def build_model(ckpt, source, bert_path=None):
    """-> (HREM holding the checkpoint's encoder weights, its options). Every key and shape is
    checked (lib.checkpoint.load_module_state); the relation module is left as built."""
    args = checkpoint_args(ckpt)
    if bert_path is not None:
        args.bert_path = bert_path
    arch = ckpt_lib.architecture(ckpt)
    try:
        bert = load_text_backbone(args.bert_path, pretrained=False)
    except UserError as err:
        if bert_path is not None:
            raise
        # e.g. an authors' checkpoint names a folder on their machine
        raise UserError(f'{source} names its text model {args.bert_path!r} in its saved options, which is '
                        f'not usable here ({err}); pass --bert_path with a local copy, e.g. '
                        'data/bert-base-uncased') from err
    if bert.config.hidden_size != arch['text_hidden']:
        raise UserError(f'{source} was trained with a text model of hidden size {arch["text_hidden"]}, but '
                        f'{args.bert_path} has {bert.config.hidden_size}; pass the matching --bert_path')
    model = HREM(args, arch['img_dim'], bert)
    ckpt_lib.load_model_weights(model, ckpt, source, relation=False)
    return model, args


def load_for_inference(path, device, bert_path=None):
    """-> (model in eval mode on device, its options, its tokenizer). The text model's config and
    vocabulary come from bert_path (default: the one it was trained with); weights from the file."""
    model, args = build_model(ckpt_lib.read_checkpoint(path), path, bert_path)
    return model.to(device).eval(), args, load_tokenizer(args.bert_path)

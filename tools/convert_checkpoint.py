"""Convert an HREM checkpoint between this project's format and the authors' (CrossmodalGroup/HREM).

  python tools/convert_checkpoint.py their/model_best.pth ours.pth                       # theirs -> ours
  python tools/convert_checkpoint.py runs/f30k/model_best.pth theirs.pth --to authors    # ours -> theirs
  python tools/convert_checkpoint.py runs/f30k/model_best.pth hrem_f30k --to safetensors # weights + JSON config

--to safetensors writes a folder (lib/exported.py) that eval.py, search.py and the Python API load
like a checkpoint, without unpickling anything.

With --bert_path (the BERT folder for config and vocabulary) every key and shape is first checked
against a model built from the checkpoint. Their format holds the two encoders only: the relation
module and optimizer state of our checkpoints are not carried over, and a converted authors'
checkpoint starts a new run with `train.py --init_from`, not --resume.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import arguments  # noqa: E402

from lib import checkpoint as ckpt_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.loading import model_from_checkpoint  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    p.add_argument('src', help="checkpoint to read (ours or the authors'; read safely, no code runs)")
    p.add_argument('dst', help='file to write')
    p.add_argument('--to', default='ours', choices=['ours', 'authors', 'safetensors'],
                   help='format of dst (safetensors: a folder of weights, JSON config and text model config)')
    p.add_argument('--bert_path', help='text model folder: check every key and shape against a model first')
    return p


@exit_on_user_error
def main(argv=None):
    opts = get_parser().parse_args(argv)
    if os.path.abspath(opts.src) == os.path.abspath(opts.dst):
        raise UserError(f'{opts.dst} is the file being converted; write to another path')
    ckpt = ckpt_lib.read_checkpoint(opts.src)
    if opts.bert_path or opts.to == 'safetensors':
        model_from_checkpoint(ckpt, opts.src, opts.bert_path, relation=True)
    if opts.to == 'safetensors':
        from lib.exported import write_exported
        write_exported(ckpt, opts.dst, opts.bert_path or ckpt['config']['bert_path'])
    else:
        out = ckpt_lib.to_authors(ckpt) if opts.to == 'authors' else ckpt
        ckpt_lib.save_atomic(out, opts.dst)
    arch = ckpt_lib.architecture(ckpt)
    checked = 'every key checked' if opts.bert_path or opts.to == 'safetensors' else 'keys not checked (pass --bert_path to check them)'
    print(f'{opts.src} -> {opts.dst} ({opts.to} format): embedding {arch["embed_size"]}, regions '
          f'{arch["img_dim"]}-d, text hidden {arch["text_hidden"]}, epoch {ckpt["epoch"]}; {checked}')


if __name__ == '__main__':
    main()

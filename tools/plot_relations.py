"""Draw the instance-level graph a trained HREM builds over one batch.

    python tools/plot_relations.py --checkpoint runs/demo/model_best.pth   # writes runs/demo/relations.png

The batch is B images of a split (default: the checkpoint's dataset, its test split, B = its
--batch_size), each with one of its captions, so that caption j describes image j. The figure
shows the connection (who attends to whom) and the relevance (how strongly) of the four blocks of
the 2B x 2B graph, image-image, image-text, text-image and text-text (rows are the queries; the two
intra-modal blocks share one colour scale, the two cross-modal blocks another), as
model.relation.relations computes them in training; and, for a few images, the captions and
images they are most relevant to among their connections (thumbnails with --image_dir, the
split's images as search.py takes them).
"""
import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use('Agg')  # files only: works on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import arguments  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from lib.data import PrecompSplit, pad_batch, split_files  # noqa: E402
from lib.distributed import pick_device  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.writing import save_figure  # noqa: E402
from lib.loading import model_from_checkpoint, read_model_file, saved_options, text_model_of  # noqa: E402
from lib.text_model import load_tokenizer  # noqa: E402

# (name, rows, columns) of the 2B x 2B graph; rows are queries, [[i2i, i2t], [t2i, t2t]]
BLOCKS = (('image-image', 0, 0), ('image-text', 0, 1), ('text-image', 1, 0), ('text-text', 1, 1))
NODE = ('image', 'caption')


def load_relation_model(path, device, bert_path=None):
    """-> (HREM in eval mode with its encoders and its trained relation module, the run's options
    (with the text model used), checkpoint)."""
    ckpt = read_model_file(path)
    model, config = model_from_checkpoint(ckpt, path, text_model_of(path, ckpt, bert_path), relation=True)
    args = SimpleNamespace(**{**saved_options(ckpt), 'bert_path': config.bert_path, 'warmup': config.warmup})
    if getattr(model, 'relation', None) is None:
        raise UserError(f'{path} was trained without instance-level relations (--instance_relation 0); '
                        'there is no graph to draw. Pass a checkpoint of a run with the relations on')
    state = ckpt['model'].get('relation')
    if state is None:
        raise UserError(f"{path} holds no relation module (the authors' checkpoint format has no place for it; "
                        "it keeps the encoders only); pass a model_best.pth or checkpoint_last.pth of this "
                        "project's train.py")
    if ckpt['iteration'] <= args.warmup:
        print(f'warning: {path} was saved at step {ckpt["iteration"]}, before the relations switch on at step '
              f'{args.warmup} (--warmup): its relation module is still untrained', file=sys.stderr)
    return model.to(device).eval(), args, ckpt


def pick_batch(split, batch_size, batch_index=0, seed=None):
    """(image indices, caption indices) of one batch: B distinct images and one caption of each.
    Default: images batch_index * B ... (batch_index + 1) * B - 1 with their first caption;
    with a seed, B random images and a random caption of each."""
    n = split.n_images
    if batch_size < 2 or batch_size > n:
        raise UserError(f'--batch_size {batch_size}: the batch takes distinct images of a split of {n}; '
                        f'give 2 .. {n}')
    if seed is not None:
        rng = np.random.default_rng(seed)
        images = np.sort(rng.choice(n, batch_size, replace=False))
        return images, images * split.per_image + rng.integers(0, split.per_image, batch_size)
    if not 0 <= batch_index < n // batch_size:
        raise UserError(f'--batch_index {batch_index}: the split has {n // batch_size} whole batches of '
                        f'{batch_size} images (0 .. {n // batch_size - 1})')
    images = np.arange(batch_index * batch_size, (batch_index + 1) * batch_size)
    return images, images * split.per_image


@torch.no_grad()
def batch_graph(model, split, images, captions, device):
    """The relation module on one batch -> {'connect': (2B, 2B) bool, 'relevance': (2B, 2B) float,
    'reg': KL regulariser}, numpy, rows/columns = the B images then the B captions."""
    regions = torch.from_numpy(np.asarray(split.images[images], dtype=np.float32)).to(device)
    region_lengths = torch.full((len(images),), regions.shape[1], device=device)  # every region valid
    tokens, token_lengths = pad_batch([split.text.encode(*split.tokens.pieces(c)) for c in captions], np.int64)
    tokens, token_lengths = tokens.to(device), token_lengths.to(device)
    img, local_regions = model.encode_image(regions, region_lengths)
    cap, words = model.encode_text(tokens, token_lengths)
    connect, relevance, reg = model.relation.relations(img, cap, local_regions, words, token_lengths)
    return {'connect': connect.cpu().numpy(), 'relevance': relevance.float().cpu().numpy(), 'reg': float(reg)}


def block(matrix, rows, cols):
    """One of the four B x B blocks of a 2B x 2B matrix."""
    b = matrix.shape[0] // 2
    return matrix[rows * b:(rows + 1) * b, cols * b:(cols + 1) * b]


def strongest(graph, node, rows, cols, k, skip_self=False):
    """[(index, relevance)] of the k most relevant connected neighbours of `node` in one block."""
    connected, relevance = block(graph['connect'], rows, cols)[node], block(graph['relevance'], rows, cols)[node]
    candidates = [j for j in np.argsort(-relevance, kind='stable') if connected[j] and not (skip_self and j == node)]
    return [(int(j), float(relevance[j])) for j in candidates[:k]]


def short(text, width=90):
    return textwrap.shorten(text, width, placeholder=' ...')


def relevance_scales(graph):
    """{(rows, cols): (vmin, vmax)}: blocks that are compared share a colour scale. The intra-modal
    blocks are exp(-distance), in (0, 1]; the two cross-modal ones are unbounded MLP scores, drawn
    on the range of both."""
    cross = np.concatenate([block(graph['relevance'], 0, 1).ravel(), block(graph['relevance'], 1, 0).ravel()])
    return {(0, 0): (0.0, 1.0), (1, 1): (0.0, 1.0),
            (0, 1): (float(cross.min()), float(cross.max())), (1, 0): (float(cross.min()), float(cross.max()))}


def draw_heatmaps(fig, grid, graph):
    """Row 0: connection of each block; row 1: its relevance (see relevance_scales)."""
    scales = relevance_scales(graph)
    for col, (name, rows, cols) in enumerate(BLOCKS):
        for row, (key, cmap) in enumerate((('connect', 'Greys'), ('relevance', 'viridis'))):
            ax = fig.add_subplot(grid[row, col])
            ax.set_label(f'{key}/{name}')  # tests find each heatmap by this label
            data = block(graph[key], rows, cols)
            vmin, vmax = (0, 1) if key == 'connect' else scales[rows, cols]
            im = ax.imshow(data, cmap=cmap, interpolation='nearest', vmin=vmin, vmax=vmax)
            if key == 'relevance':
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            else:
                ax.set_title(f'{name}: connected, black ({data.mean():.0%})', fontsize=10)
            ax.set_ylabel(f'query {NODE[rows]}', fontsize=9)
            ax.set_xlabel(f'{NODE[cols]} (relevance)' if key == 'relevance' else NODE[cols], fontsize=9)
            ax.tick_params(labelsize=7)


def draw_neighbours(fig, cell, graph, node, texts, files, image_ids, k, thumb):
    """One image of the batch: its caption, the captions and images it is most relevant to."""
    caps = strongest(graph, node, 0, 1, k)
    imgs = strongest(graph, node, 0, 0, k, skip_self=True)
    lines = [f'image {image_ids[node]}: "{short(texts[node], 110)}"', 'most relevant connected captions:']
    lines += [f'  {r:6.2f}  "{short(texts[j])}"' + ('  (its own)' if j == node else '') for j, r in caps]
    if files is None:
        lines.append('most relevant connected images: ' + ', '.join(f'{image_ids[j]} ({r:.2f})' for j, r in imgs))
        ax = fig.add_subplot(cell)
        ax.axis('off')
        ax.text(0, 1, '\n'.join(lines), va='top', ha='left', family='monospace', fontsize=8, transform=ax.transAxes)
        return
    from lib.images import thumbnail  # letterboxed BGR square, grey when unreadable
    sub = cell.subgridspec(1, 3 + k, width_ratios=[1] * (1 + k) + [0.3, 3 * k / 2])
    for pos, (j, label) in enumerate([(node, 'query')] + [(j, f'{r:.2f}') for j, r in imgs]):
        ax = fig.add_subplot(sub[0, pos])
        ax.imshow(thumbnail(files[image_ids[j]], thumb)[..., ::-1])
        ax.set_title(f'{image_ids[j]}: {label}', fontsize=8)
        ax.axis('off')
    ax = fig.add_subplot(sub[0, -1])
    ax.axis('off')
    ax.text(0, 1, '\n'.join(lines), va='top', ha='left', family='monospace', fontsize=8, transform=ax.transAxes)


def draw(graph, texts, image_ids, examples, k=3, files=None, title='', thumb=96):
    """The figure: heatmaps of the four blocks, then one row per example image (batch positions)."""
    fig = plt.figure(figsize=(18, 8.4 + 1.9 * len(examples)))
    grid = fig.add_gridspec(2 + len(examples), 4, height_ratios=[4, 4] + [1.6] * len(examples))
    draw_heatmaps(fig, grid, graph)
    for row, node in enumerate(examples):
        draw_neighbours(fig, grid[2 + row, :], graph, node, texts, files, image_ids, k, thumb)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('--checkpoint', required=True,
                   help="model_best.pth or checkpoint_last.pth of this project's train.py")
    p.add_argument('--out', default=None, help='PNG file to write; when not given: relations.png next to the checkpoint')
    p.add_argument('--data_path', default=None, help="folder that holds <dataset>_precomp/; when not given: the checkpoint's")
    p.add_argument('--dataset', default=None, help="dataset name; when not given: the checkpoint's")
    p.add_argument('--split', default=None, help="split to draw from; when not given: the dataset's test split (COCO: testall)")
    p.add_argument('--bert_path', default=None, help="text model folder; when not given: the checkpoint's")
    p.add_argument('--batch_size', type=int, default=None, help="images in the batch; when not given: the checkpoint's batch size")
    p.add_argument('--batch_index', type=int, default=0, help='which batch of consecutive images')
    p.add_argument('--seed', type=int, default=None, help='instead: B random images, a random caption of each')
    p.add_argument('--examples', type=int, nargs='+', default=[0, 1, 2],
                   help='batch positions of the images whose neighbours are listed')
    p.add_argument('--k', type=int, default=3, help='neighbours listed per example')
    p.add_argument('--image_dir', default=None, help="the split's images: thumbnails of the examples' neighbours")
    p.add_argument('--device', default=None, help='cuda, cuda:N or cpu; when not given: cuda when present, else cpu')
    args = p.parse_args(argv)
    if args.k < 1:
        p.error('--k must be >= 1')
    return args


@exit_on_user_error
def main(argv=None):
    opts = parse_args(argv)
    device = pick_device(opts.device)
    model, args, ckpt = load_relation_model(opts.checkpoint, device, opts.bert_path)
    dataset = opts.dataset or args.dataset
    data_path = opts.data_path or args.data_path
    split_name = opts.split or arguments.test_split_of(dataset)
    split = PrecompSplit(data_path, dataset, split_name, load_tokenizer(args.bert_path))
    batch_size = opts.batch_size or min(args.batch_size, split.n_images)
    if int(batch_size * model.relation.threshold) < 1:
        raise UserError(f'--batch_size {batch_size} with threshold {model.relation.threshold} keeps no connection; '
                        'give a larger --batch_size')
    bad = [e for e in opts.examples if not 0 <= e < batch_size]
    if bad:
        raise UserError(f'--examples {bad[0]} is not a position in the batch (0 .. {batch_size - 1})')
    images, captions = pick_batch(split, batch_size, opts.batch_index, opts.seed)
    graph = batch_graph(model, split, images, captions, device)
    files = None
    if opts.image_dir:
        from lib.images import gallery_files
        files = gallery_files(opts.image_dir, os.path.dirname(split_files(data_path, dataset, split_name)[0]),
                              split_name, split.n_images)
    title = (f'{opts.checkpoint} (step {ckpt["iteration"]}): instance-level graph of {batch_size} images of '
             f'{dataset} {split_name} and one caption each (caption j describes image j); each row keeps its top '
             f'{int(batch_size * model.relation.threshold)} connections; KL regulariser {graph["reg"]:.3f}')
    fig = draw(graph, [split.captions[c] for c in captions], images, opts.examples, opts.k, files,
               '\n'.join(textwrap.wrap(title, 180)))
    out = opts.out or os.path.join(os.path.dirname(opts.checkpoint), 'relations.png')
    save_figure(fig, out, dpi=80)
    plt.close(fig)
    print(f'wrote {out}')
    return graph, images, captions


if __name__ == '__main__':
    main()

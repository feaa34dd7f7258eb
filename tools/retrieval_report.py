"""See what a model retrieves: a static HTML report of a split's retrievals, and a paper figure.

    python tools/retrieval_report.py --checkpoint runs/demo/model_best.pth --out report/
    python tools/retrieval_report.py --checkpoint A.pth --compare B.pth --out report/
    python tools/retrieval_report.py --sims results_coco.npy --captions data/coco_precomp/testall_caps.txt --out report/
    python tools/retrieval_report.py --checkpoint runs/shapes/model_best.pth --image_dir data/shapes_images/test \\
        --figure imgs/retrieval.png --queries 70 112 0 106 --image_queries

<out>/index.html opens from disk in any browser, with no server and no network: a summary
(R@K, medr, meanr, rsum, as eval.py computes them; with --compare both models and B - A), then
every caption query with its top-k images and every image query with its top-k captions, the
right ones marked, failures first, filterable by the truth's rank and by text, paged. The
per-query data sits in <out>/report_data.js (a script, since browsers refuse fetch() of file://),
thumbnails (with --image_dir) in <out>/thumbs/. --figure writes a figure of a few queries
(PNG, or PDF with vector text).
"""
import argparse
import html
import json
import os
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import arguments  # noqa: E402
from lib.data import load_captions, split_files  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.images import read_image  # noqa: E402
from lib.evaluation import RECALL_AT, check_sims_shape, evaluate_sims, i2t_ranks, load_sims, t2i_ranks  # noqa: E402
from lib.checkpoint_sims import checkpoint_sims  # noqa: E402
from lib.loading import read_model_file, saved_options  # noqa: E402

THUMB = 128  # report thumbnails (pixels, letterboxed squares)
FIGURE_THUMB = 256
TOP_CHUNK = 2048  # queries whose top-k are taken at a time
METRICS = [('i2t', f'r{k}') for k in RECALL_AT] + [('i2t', 'medr'), ('i2t', 'meanr')] + \
          [('t2i', f'r{k}') for k in RECALL_AT] + [('t2i', 'medr'), ('t2i', 'meanr')]


def info(message):
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------- inputs

def checkpoint_source(path, opts, data_path=None, dataset=None, split=None):
    """-> (similarities, caption file, split name, dataset) of a checkpoint, computed by eval.py's
    own code path (lib.checkpoint_sims), so the report's numbers are eval.py's."""
    saved = saved_options(read_model_file(path))
    dataset = dataset or opts.dataset or saved['dataset']
    data_path = data_path or opts.data_path or saved['data_path']
    split = split or opts.split or arguments.test_split_of(dataset)
    sims, _ = checkpoint_sims([path], opts.device, data_path=data_path, dataset=dataset, split=split,
                              bert_path=opts.bert_path, batch_size=opts.batch_size)
    return sims, split_files(data_path, dataset, split)[1], split, dataset, data_path


def caption_file(opts):
    if opts.captions:
        return opts.captions
    if not opts.dataset:
        raise UserError('--sims needs the split\'s captions: pass --captions <split>_caps.txt, or --dataset '
                        '(with --data_path and --split) to find them')
    return split_files(opts.data_path or 'data/', opts.dataset, opts.split or arguments.test_split_of(opts.dataset))[1]


def split_captions(caps_path, n_captions):
    """The split's captions, as many as the matrix has (eval caps the dev split at 5000)."""
    if not os.path.isfile(caps_path):
        raise UserError(f'caption file {caps_path} does not exist; pass the split\'s <split>_caps.txt with --captions')
    captions = load_captions(caps_path)
    if len(captions) < n_captions:
        raise UserError(f'{caps_path} has {len(captions)} captions but the similarities have {n_captions} '
                        'columns; pass the caption file of the split the similarities were computed on')
    return captions[:n_captions]


def image_files(image_dir, caps_path, split, n_images):
    """The split's image files, in its order (<split>_images.txt next to the captions, as written by
    tools/extract_features.py, or sorted file names), as search.py finds them."""
    from lib.images import gallery_files
    return gallery_files(image_dir, os.path.dirname(os.path.abspath(caps_path)), split, n_images)


# ----------------------------------------------------------------------------- ranking

def top_k(sims, k):
    """(indices, scores) of the k largest entries of each row, best first (torch.topk in chunks)."""
    s = torch.as_tensor(sims)
    k = min(k, s.shape[1])
    idx = np.empty((s.shape[0], k), np.int64)
    val = np.empty((s.shape[0], k), np.float32)
    for start in range(0, s.shape[0], TOP_CHUNK):
        v, i = torch.topk(s[start:start + TOP_CHUNK].float(), k, dim=1)
        idx[start:start + len(i)], val[start:start + len(i)] = i.numpy(), v.numpy()
    return idx, val


def analyse(sims, k, fold5=False):
    """Metrics (lib.evaluation.evaluate_sims), ranks of the truth (its rank counting, 0-based) and
    the top-k of every query in both directions."""
    sims = np.asarray(sims, dtype=np.float32)
    per_image = check_sims_shape(sims)
    t = torch.from_numpy(sims)
    t2i_top, t2i_score = top_k(t.t(), k)
    i2t_top, i2t_score = top_k(t, k)
    return {'results': evaluate_sims(sims, fold5), 'per_image': per_image,
            't2i_rank': t2i_ranks(t, per_image), 'i2t_rank': i2t_ranks(t, per_image),
            't2i_top': t2i_top, 't2i_score': t2i_score, 'i2t_top': i2t_top, 'i2t_score': i2t_score}


def paired(a, b):
    """B - A for every metric of the whole matrix, and how many queries each ranks the truth higher."""
    ra, rb = a['results'][0], b['results'][0]
    diff = {side: {m: rb[side][m] - ra[side][m] for m in ra[side]} for side in ('i2t', 't2i')}
    diff['rsum'] = rb['rsum'] - ra['rsum']
    counts = {}
    for side in ('t2i', 'i2t'):
        x, y = a[f'{side}_rank'], b[f'{side}_rank']
        counts[side] = {'b_better': int((y < x).sum()), 'a_better': int((x < y).sum()), 'same': int((x == y).sum())}
    return diff, counts


# ----------------------------------------------------------------------------- thumbnails

def letterbox(path, size):
    from lib.images import thumbnail
    return thumbnail(path, size)


def write_thumbs(files, folder):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, path in enumerate(files):
        name = f'{i:05d}.jpg'
        ok, jpg = cv2.imencode('.jpg', letterbox(path, THUMB), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise UserError(f'could not encode a thumbnail of {path}')
        jpg.tofile(os.path.join(folder, name))
        names.append(name)
    return names


# ----------------------------------------------------------------------------- the page

def fmt(value, metric):
    return f'{value:.1f}' if metric == 'medr' else f'{value:.2f}'


def summary_html(meta, analyses, labels, diff, counts):
    head = ''.join(f'<th>{side} {m.replace("r", "R@", 1) if m.startswith("r") and m[1:].isdigit() else m}</th>'
                   for side, m in METRICS) + '<th>rsum</th>'
    rows = []
    for label, a in zip(labels, analyses):
        for r in a['results']:
            name = f'{label}' + ('' if r['name'] == 'full' else f' ({r["name"]})')
            key = label if r['name'] == 'full' else f'{label}-{r["name"]}'
            cells = ''.join(f'<td data-metric="{side}_{m}">{fmt(r[side][m], m)}</td>' for side, m in METRICS)
            rows.append(f'<tr data-row="{html.escape(key)}"><th>{html.escape(name)}</th>{cells}'
                        f'<td data-metric="rsum">{r["rsum"]:.2f}</td></tr>')
    if diff is not None:
        cells = ''.join(f'<td data-metric="{side}_{m}">{diff[side][m]:+.2f}</td>' for side, m in METRICS)
        rows.append(f'<tr data-row="diff" class="diff"><th>B &minus; A</th>{cells}'
                    f'<td data-metric="rsum">{diff["rsum"]:+.2f}</td></tr>')
    table = f'<table class="metrics"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
    sources = ''.join(f'<li><b>{"AB"[i]}</b> = {html.escape(label)}: <code>{html.escape(src)}</code></li>'
                      for i, (label, src) in enumerate(zip(labels, meta['sources'])))
    text = (f'<p>{html.escape(meta["dataset"] or "")} <b>{html.escape(meta["split"])}</b>: {meta["n_images"]} images, '
            f'{meta["n_captions"]} captions ({meta["per_image"]} per image); top {meta["k"]} shown per query. '
            'R@K in %, medr / meanr 1-based, as <code>eval.py</code> computes them.</p>')
    if counts is not None:
        text += '<p class="changes">' + '; '.join(
            f'{"text-to-image" if side == "t2i" else "image-to-text"}: B ranks the truth higher on '
            f'<span data-count="{side}-b_better">{c["b_better"]}</span> queries, A on '
            f'<span data-count="{side}-a_better">{c["a_better"]}</span>, equal on '
            f'<span data-count="{side}-same">{c["same"]}</span>' for side, c in counts.items()) + '</p>'
    return f'<ul class="sources">{sources}</ul>{text}{table}'


def report_data(meta, analyses, captions, thumbs):
    def block(side):
        return {'rank': [a[f'{side}_rank'].tolist() for a in analyses],
                'top': [a[f'{side}_top'].ravel().tolist() for a in analyses],
                'score': [np.round(a[f'{side}_score'].ravel().astype(np.float64), 3).tolist() for a in analyses]}
    return {'meta': meta, 'captions': captions, 'thumbs': thumbs, 't2i': block('t2i'), 'i2t': block('i2t')}


def write_report(out, meta, analyses, labels, captions, files):
    os.makedirs(out, exist_ok=True)
    thumbs = write_thumbs(files, os.path.join(out, 'thumbs')) if files else None
    diff = counts = None
    if len(analyses) == 2:
        diff, counts = paired(*analyses)
    meta = dict(meta, labels=labels)
    data = report_data(meta, analyses, captions, thumbs)
    with open(os.path.join(out, 'report_data.js'), 'w', encoding='utf-8') as f:
        f.write('window.REPORT = ')
        json.dump(data, f, separators=(',', ':'))  # ASCII only: safe inside a script
        f.write(';\n')
    page = PAGE.replace('%TITLE%', html.escape(meta['title'])) \
               .replace('%SUMMARY%', summary_html(meta, analyses, labels, diff, counts))
    with open(os.path.join(out, 'index.html'), 'w', encoding='utf-8') as f:
        f.write(page)
    return os.path.join(out, 'index.html')


def folder_size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


PAGE = r'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>%TITLE%</title>
<style>
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 24px 40px; color: #222; }
h1 { font-size: 20px; margin: 16px 0 4px; }
table.metrics { border-collapse: collapse; margin: 8px 0 16px; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
table.metrics tr.diff td { font-weight: bold; }
.controls { position: sticky; top: 0; background: #fafafa; border-bottom: 1px solid #ddd; padding: 8px 0;
            display: flex; flex-wrap: wrap; gap: 10px; align-items: center; z-index: 2; }
.controls button.active { background: #2a6fdb; color: #fff; border-color: #2a6fdb; }
.controls input[type=search] { width: 260px; }
.query { border-bottom: 1px solid #eee; padding: 8px 0; }
.qhead { margin-bottom: 4px; }
.qhead .qid { color: #888; margin-right: 6px; }
.rank { display: inline-block; padding: 0 6px; border-radius: 3px; background: #eee; margin-left: 6px; font-size: 12px; }
.rank.hit { background: #d7f3dc; } .rank.miss { background: #fbdada; }
.better { color: #137a2a; font-weight: bold; } .worse { color: #b3261e; font-weight: bold; }
.tops { display: flex; gap: 6px; align-items: flex-start; margin: 2px 0; }
.tops .model { width: 18px; font-weight: bold; color: #555; padding-top: 4px; }
.cell { width: 132px; border: 3px solid transparent; padding: 2px; font-size: 12px; }
.cell img { width: 128px; height: 128px; display: block; }
.cell.truth { border-color: #1a9c3a; background: #eefbf0; }
.cell.truthref { border: 3px dashed #1a9c3a; margin-left: 14px; opacity: 0.85; }
.cell .cap { color: #444; overflow: hidden; display: -webkit-box; -webkit-line-clamp: 4; -webkit-box-orient: vertical; }
.cell .lbl { color: #666; }
ol.caps { margin: 2px 0 2px 0; padding-left: 28px; }
ol.caps li.truth { color: #137a2a; font-weight: bold; }
.qimg img { width: 128px; height: 128px; display: block; }
.i2t .query { display: flex; gap: 12px; align-items: flex-start; }
.own { color: #666; font-size: 12px; }
.pager { margin: 10px 0; }
#status { color: #555; }
</style></head>
<body>
<h1>%TITLE%</h1>
<div id="summary">%SUMMARY%</div>
<div class="controls">
  <button id="view-t2i" class="active">text &rarr; image</button>
  <button id="view-i2t">image &rarr; text</button>
  <label>show <select id="filter">
    <option value="0">all queries</option>
    <option value="1">truth not in the top 1</option>
    <option value="5">truth not in the top 5</option>
    <option value="10">truth not in the top 10</option></select></label>
  <label id="model-label" hidden>ranks of <select id="model"><option value="0">A</option><option value="1">B</option></select></label>
  <label id="change-label" hidden><select id="change">
    <option value="all">A and B alike or not</option>
    <option value="b">B ranks the truth higher</option>
    <option value="a">A ranks the truth higher</option>
    <option value="changed">rank changed</option></select></label>
  <label>sort <select id="sort">
    <option value="worst">failures first (truth's rank)</option>
    <option value="index">query order</option>
    <option value="gain" data-compare>largest gain of B first</option>
    <option value="loss" data-compare>largest loss of B first</option></select></label>
  <input type="search" id="search" placeholder="filter queries by text">
  <label>per page <select id="pagesize"><option value="25">25</option><option value="50" selected>50</option><option value="100">100</option></select></label>
</div>
<div class="pager"><button id="prev">&larr; previous</button> <span id="status"></span> <button id="next">next &rarr;</button></div>
<div id="results"></div>
<div class="pager"><button id="prev2">&larr; previous</button> <button id="next2">next &rarr;</button></div>
<script src="report_data.js"></script>
<script>
"use strict";
(function () {
  var R = window.REPORT;
  if (!R) { document.getElementById('results').textContent = 'report_data.js is missing next to index.html'; return; }
  var M = R.meta, K = M.k, P = M.per_image, NM = R.t2i.rank.length, labels = 'AB';
  var st = {view: 't2i', filter: 0, model: 0, change: 'all', sort: 'worst', search: '', page: 0, size: 50};
  var lower = {t2i: null, i2t: null}, order = null, orderKey = '';
  var $ = function (id) { return document.getElementById(id); };
  function esc(s) { return String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;'); }
  function nQueries(v) { return v === 't2i' ? M.n_captions : M.n_images; }
  function truthOf(v, q) { return v === 't2i' ? Math.floor(q / P) : q; }
  function texts(v) {  // lower-cased text of every query, built on the first search
    if (!lower[v]) {
      var n = nQueries(v), a = new Array(n);
      for (var q = 0; q < n; q++) a[q] = (v === 't2i' ? R.captions[q] : ('image ' + q + ' ' + R.captions.slice(q * P, q * P + P).join(' '))).toLowerCase();
      lower[v] = a;
    }
    return lower[v];
  }
  function sorted(v) {  // query order of the current sort (cached)
    var key = v + st.sort + st.model;
    if (orderKey === key) return order;
    var n = nQueries(v), idx = new Array(n), r = R[v].rank, m = st.model;
    for (var q = 0; q < n; q++) idx[q] = q;
    if (st.sort === 'worst') idx.sort(function (x, y) { return r[m][y] - r[m][x] || x - y; });
    else if (st.sort === 'gain') idx.sort(function (x, y) { return (r[0][y] - r[1][y]) - (r[0][x] - r[1][x]) || x - y; });
    else if (st.sort === 'loss') idx.sort(function (x, y) { return (r[1][y] - r[0][y]) - (r[1][x] - r[0][x]) || x - y; });
    order = idx; orderKey = key;
    return idx;
  }
  function selected() {
    var v = st.view, r = R[v].rank, m = st.model, f = st.filter, words = st.search.toLowerCase().trim();
    var t = words ? texts(v) : null, out = [], idx = sorted(v);
    for (var i = 0; i < idx.length; i++) {
      var q = idx[i];
      if (f && r[m][q] < f) continue;
      if (NM > 1 && st.change !== 'all') {
        var a = r[0][q], b = r[1][q];
        if ((st.change === 'b' && !(b < a)) || (st.change === 'a' && !(a < b)) || (st.change === 'changed' && a === b)) continue;
      }
      if (t && t[q].indexOf(words) < 0) continue;
      out.push(q);
    }
    return out;
  }
  function rankBadge(v, q, m) {
    var rank = R[v].rank[m][q] + 1, cls = rank <= K ? 'hit' : 'miss';
    var s = '<span class="rank ' + cls + '" data-model="' + m + '" data-rank="' + rank + '">' +
            (NM > 1 ? labels[m] + ': ' : '') + 'truth at rank ' + rank + '</span>';
    return s;
  }
  function change(v, q) {
    if (NM < 2) return '';
    var a = R[v].rank[0][q], b = R[v].rank[1][q];
    if (b < a) return ' <span class="better" data-change="b">B better by ' + (a - b) + '</span>';
    if (a < b) return ' <span class="worse" data-change="a">A better by ' + (b - a) + '</span>';
    return '';
  }
  function imageCell(i, score, j, truth) {
    var s = '<div class="cell' + (i === truth ? ' truth' : '') + '" data-image="' + i + '" title="' +
            esc(R.captions.slice(i * P, i * P + P).join('\n')) + '">';
    if (R.thumbs) s += '<img loading="lazy" src="thumbs/' + R.thumbs[i] + '" alt="image ' + i + '">';
    s += '<div class="lbl">' + (j + 1) + '. image ' + i + ' &middot; ' + score.toFixed(3) + (i === truth ? ' &#10003;' : '') + '</div>';
    if (!R.thumbs) s += '<div class="cap">' + esc(R.captions[i * P]) + '</div>';
    return s + '</div>';
  }
  function renderT2I(q) {
    var truth = truthOf('t2i', q), s = '<div class="query" data-query="' + q + '" data-truth="' + truth + '">';
    s += '<div class="qhead"><span class="qid">caption ' + q + '</span>' + esc(R.captions[q]);
    for (var m = 0; m < NM; m++) s += rankBadge('t2i', q, m);
    s += change('t2i', q) + '</div>';
    for (m = 0; m < NM; m++) {
      s += '<div class="tops" data-model="' + m + '">' + (NM > 1 ? '<span class="model">' + labels[m] + '</span>' : '');
      for (var j = 0; j < K; j++) s += imageCell(R.t2i.top[m][q * K + j], R.t2i.score[m][q * K + j], j, truth);
      var rank = R.t2i.rank[m][q] + 1;
      if (rank > K) {  // the truth, for reference, after the top k
        s += '<div class="cell truthref" data-truth-image="' + truth + '" title="' + esc(R.captions.slice(truth * P, truth * P + P).join('\n')) + '">';
        if (R.thumbs) s += '<img loading="lazy" src="thumbs/' + R.thumbs[truth] + '" alt="image ' + truth + '">';
        s += '<div class="lbl">the truth: image ' + truth + ', rank ' + rank + '</div>';
        if (!R.thumbs) s += '<div class="cap">' + esc(R.captions[truth * P]) + '</div>';
        s += '</div>';
      }
      s += '</div>';
    }
    return s + '</div>';
  }
  function renderI2T(q) {
    var s = '<div class="query" data-query="' + q + '" data-truth="' + q + '">';
    if (R.thumbs) s += '<div class="qimg"><img src="thumbs/' + R.thumbs[q] + '" alt="image ' + q + '"></div>';
    s += '<div class="qbody"><div class="qhead"><span class="qid">image ' + q + '</span>';
    for (var m = 0; m < NM; m++) s += rankBadge('i2t', q, m);
    s += change('i2t', q) + '</div><details class="own"><summary>its captions</summary>' +
         esc(R.captions.slice(q * P, q * P + P).join(' | ')) + '</details>';
    for (m = 0; m < NM; m++) {
      s += '<div class="tops" data-model="' + m + '">' + (NM > 1 ? '<span class="model">' + labels[m] + '</span>' : '') + '<ol class="caps">';
      for (var j = 0; j < K; j++) {
        var c = R.i2t.top[m][q * K + j], ok = Math.floor(c / P) === q;
        s += '<li class="' + (ok ? 'truth' : '') + '" data-caption="' + c + '">' + (ok ? '&#10003; ' : '') + esc(R.captions[c]) +
             ' <span class="lbl">(caption ' + c + ', image ' + Math.floor(c / P) + ', ' + R.i2t.score[m][q * K + j].toFixed(3) + ')</span></li>';
      }
      s += '</ol></div>';
    }
    return s + '</div></div>';
  }
  function render() {
    var t0 = performance.now(), qs = selected(), pages = Math.max(1, Math.ceil(qs.length / st.size));
    if (st.page >= pages) st.page = pages - 1;
    var from = st.page * st.size, to = Math.min(qs.length, from + st.size), parts = [];
    var fn = st.view === 't2i' ? renderT2I : renderI2T;
    for (var i = from; i < to; i++) parts.push(fn(qs[i]));
    var box = $('results');
    box.className = st.view;
    box.innerHTML = parts.join('') || '<p>no query matches</p>';
    $('status').textContent = (qs.length ? (from + 1) + '\u2013' + to : '0') + ' of ' + qs.length + ' ' +
      (st.view === 't2i' ? 'caption' : 'image') + ' queries (' + nQueries(st.view) + ' in all), page ' + (st.page + 1) + ' of ' + pages;
    $('status').dataset.matches = qs.length; $('status').dataset.page = st.page + 1; $('status').dataset.pages = pages;
    $('prev').disabled = $('prev2').disabled = st.page === 0;
    $('next').disabled = $('next2').disabled = st.page >= pages - 1;
    window.REPORT_RENDER_MS = performance.now() - t0;
    if (window.REPORT_FIRST_PAGE_MS === undefined) {  // since the navigation's start
      window.REPORT_FIRST_PAGE_MS = performance.now();
      requestAnimationFrame(function () { setTimeout(function () { window.REPORT_FIRST_PAINT_MS = performance.now(); }, 0); });
    }
    document.body.dataset.rendered = (+document.body.dataset.rendered || 0) + 1;
  }
  function set(k, v) { st[k] = v; if (k !== 'page') st.page = 0; render(); }
  if (NM > 1) { $('model-label').hidden = false; $('change-label').hidden = false; }
  else Array.prototype.forEach.call(document.querySelectorAll('#sort option[data-compare]'), function (o) { o.remove(); });
  $('view-t2i').onclick = function () { $('view-t2i').className = 'active'; $('view-i2t').className = ''; set('view', 't2i'); };
  $('view-i2t').onclick = function () { $('view-i2t').className = 'active'; $('view-t2i').className = ''; set('view', 'i2t'); };
  $('filter').onchange = function () { set('filter', +this.value); };
  $('model').onchange = function () { set('model', +this.value); };
  $('change').onchange = function () { set('change', this.value); };
  $('sort').onchange = function () { set('sort', this.value); };
  $('pagesize').onchange = function () { set('size', +this.value); };
  var timer = null;
  $('search').oninput = function () { var v = this.value; clearTimeout(timer); timer = setTimeout(function () { set('search', v); }, 150); };
  $('prev').onclick = $('prev2').onclick = function () { if (st.page > 0) set('page', st.page - 1); };
  $('next').onclick = $('next2').onclick = function () { set('page', st.page + 1); };
  render();
})();
</script>
</body></html>
'''


# ----------------------------------------------------------------------------- the figure

def default_queries(n_images, per_image, n=3):
    """A few captions (the first of images spread over the split) and a few images."""
    imgs = sorted({round(j * n_images / n) for j in range(n)})
    return [i * per_image for i in imgs], sorted({round((j + 0.5) * n_images / 2) % n_images for j in range(2)})


def draw_figure(path, a, captions, files, queries, image_queries, k):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    matplotlib.rcParams.update({'pdf.fonttype': 42, 'ps.fonttype': 42, 'font.size': 9})
    per_image = a['per_image']
    k = min(k, a['t2i_top'].shape[1])
    cell = 1.45  # inches per thumbnail
    text_rows, image_rows = len(queries), len(image_queries)
    width = max(k * cell + 0.2, 8.0)
    heights = [cell + 0.6] * text_rows + [max(cell, 0.3 * k) + 0.35] * image_rows
    fig = plt.figure(figsize=(width, sum(heights) + 0.1))
    total, y = sum(heights) + 0.1, sum(heights) + 0.1

    def thumb(i):
        if not files:
            return None
        image = read_image(files[i])
        if image is None:
            return cv2.cvtColor(letterbox(files[i], FIGURE_THUMB), cv2.COLOR_BGR2RGB)  # the grey stand-in
        h, w = image.shape[:2]  # the centre square: no bars in a figure
        side = min(h, w)
        image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        return cv2.cvtColor(cv2.resize(image, (FIGURE_THUMB, FIGURE_THUMB), interpolation=cv2.INTER_AREA),
                            cv2.COLOR_BGR2RGB)

    def image_axes(left, bottom, size, i, framed, label):
        ax = fig.add_axes([left / width, bottom / total, size / width, size / total])
        ax.set_xticks([]), ax.set_yticks([])
        img = thumb(i)
        if img is not None:
            ax.imshow(img)
        else:
            ax.set_facecolor('#f2f2f2')
            ax.text(0.5, 0.5, f'image {i}\n\n' + '\n'.join(textwrap.wrap(captions[i * per_image], 18)[:4]),
                    ha='center', va='center', fontsize=7, transform=ax.transAxes)
        for side in ax.spines.values():
            side.set_visible(not framed and img is None)
            side.set_color('#bbbbbb')
        if framed:
            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=5, ec='#1a9c3a', clip_on=False))
        ax.set_xlabel(label, fontsize=8, labelpad=2, color='#1a9c3a' if framed else '#333333',
                      fontweight='bold' if framed else 'normal')
        return ax

    drawn = []  # (kind, query, items shown, items marked right)
    for q in queries:
        y -= heights.pop(0)
        truth, rank = q // per_image, int(a['t2i_rank'][q]) + 1
        where = f'the truth at rank {rank}' + (' (framed)' if rank <= k else '')
        fig.text(0.1 / width, (y + cell + 0.5) / total, f'"{captions[q]}"', fontsize=10, va='top', fontweight='bold')
        fig.text((width - 0.1) / width, (y + cell + 0.5) / total, where, fontsize=8, va='top', ha='right',
                 color='#1a9c3a' if rank <= k else '#b3261e')
        gap = (width - 0.2 - k * cell) / max(k - 1, 1) if k > 1 else 0
        drawn.append(('caption', q, [int(i) for i in a['t2i_top'][q, :k]], []))
        for j in range(k):
            i = int(a['t2i_top'][q, j])
            framed = i == truth
            if framed:  # what is recorded is what is drawn
                drawn[-1][3].append(i)
            image_axes(0.1 + j * (cell + min(gap, 0.15)), y + 0.2, cell - 0.08, i, framed,
                       f'{j + 1}  ·  {a["t2i_score"][q, j]:.3f}')
    for i in image_queries:
        h = heights.pop(0)
        y -= h
        image_axes(0.1, y + h - cell - 0.15, cell - 0.08, i, False, f'image {i}: truth at rank {int(a["i2t_rank"][i]) + 1}')
        x0 = 0.1 + cell + 0.15
        drawn.append(('image', i, [int(c) for c in a['i2t_top'][i, :k]], []))
        for j in range(k):
            c = int(a['i2t_top'][i, j])
            ok = c // per_image == i
            if ok:
                drawn[-1][3].append(c)
            line = '\n'.join(textwrap.wrap(captions[c], int((width - x0) * 13)))[:200]
            fig.text(x0 / width, (y + h - 0.2 - 0.3 * j) / total, f'{"✓" if ok else "✗"} {j + 1}. {line.splitlines()[0]}',
                     fontsize=9, va='top', color='#137a2a' if ok else '#444444', fontweight='bold' if ok else 'normal')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=200 if path.lower().endswith('.png') else None)
    plt.close(fig)
    return drawn


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=arguments.HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--checkpoint', help="model_best.pth of a run (ours or the authors'); similarities as eval.py "
                                          'computes them')
    src.add_argument('--sims', help="a saved similarity file (eval.py --save_sims, the authors' results_*.npy)")
    p.add_argument('--compare', help='a second model B, of the same kind as the first (a checkpoint with '
                                     '--checkpoint, a similarity file with --sims), on the same split')
    p.add_argument('--labels', nargs='+', help='names of A (and B) in the report; the run folders or file names '
                                               'when not given')
    p.add_argument('--captions', help="with --sims: the split's <split>_caps.txt (else found from --dataset, "
                                      '--data_path and --split)')
    p.add_argument('--data_path', help="the precomp data folder; the checkpoint's when not given")
    p.add_argument('--dataset', help="dataset name; the checkpoint's when not given")
    p.add_argument('--split', help="split to report on; the dataset's test split (COCO: testall) when not given")
    p.add_argument('--bert_path', help="text model folder; the checkpoint's when not given")
    p.add_argument('--image_dir', help="the split's images (listed by <split>_images.txt next to the captions, or "
                                       'in sorted file-name order): thumbnails in the report and the figure')
    p.add_argument('--k', type=int, default=5, help='results shown per query')
    p.add_argument('--fold5', action='store_true', help='COCO testall: also the five 1K folds in the summary')
    p.add_argument('--out', help='report folder to write: index.html, report_data.js, thumbs/')
    p.add_argument('--title', help='page title; names the models and the split when not given')
    p.add_argument('--figure', help='also write a figure of a few queries (.png, or .pdf with vector text)')
    p.add_argument('--queries', type=int, nargs='*', help='caption indices of the figure\'s text queries; a few '
                                                          'spread over the split when not given')
    p.add_argument('--image_queries', type=int, nargs='*', help="image indices of the figure's image queries "
                                                                '(none: give the option with no value)')
    p.add_argument('--device', help='cuda, cuda:N or cpu; cuda when present if not given')
    p.add_argument('--batch_size', type=int, default=128, help='encoding batch size')
    args = p.parse_args(argv)
    if not args.out and not args.figure:
        p.error('give --out (the report folder), --figure, or both')
    if args.k < 1 or args.batch_size < 1:
        p.error('--k and --batch_size must be >= 1')
    if args.labels and len(args.labels) != (2 if args.compare else 1):
        p.error(f'--labels takes {2 if args.compare else 1} name(s), one per model')
    if args.figure and os.path.splitext(args.figure)[1].lower() not in ('.png', '.pdf', '.svg'):
        p.error('--figure must end in .png, .pdf or .svg')
    return args


def default_label(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder if stem in ('model_best', 'checkpoint_last') and folder else stem


@exit_on_user_error
def main(argv=None):
    opts = parse_args(argv)
    sources = [opts.checkpoint or opts.sims] + ([opts.compare] if opts.compare else [])
    for path in sources:
        if not os.path.isfile(path):
            raise UserError(f'{path} does not exist')
    if opts.checkpoint:
        sims, caps_path, split, dataset, data_path = checkpoint_source(opts.checkpoint, opts)
        all_sims = [sims]
        if opts.compare:  # B on A's split
            all_sims.append(checkpoint_source(opts.compare, opts, data_path, dataset, split)[0])
    else:
        all_sims = [load_sims(p) for p in sources]
        caps_path = caption_file(opts)
        dataset = opts.dataset
        split = opts.split or os.path.basename(caps_path).replace('_caps.txt', '')
    if len({s.shape for s in all_sims}) > 1:
        raise UserError(f'{sources[0]} and {sources[1]} have similarity matrices of different shapes '
                        f'{[s.shape for s in all_sims]}; compare models on the same split')
    n_images, n_captions = all_sims[0].shape
    captions = split_captions(caps_path, n_captions)
    files = image_files(opts.image_dir, caps_path, split, n_images) if opts.image_dir else None
    analyses = [analyse(s, opts.k, opts.fold5) for s in all_sims]
    labels = opts.labels or [default_label(p) for p in sources]
    if len(set(labels)) < len(labels):
        labels = [f'{labels[0]} (A)', f'{labels[1]} (B)']
    meta = {'title': opts.title or ' vs '.join(labels) + f': {split} retrievals', 'dataset': dataset, 'split': split,
            'n_images': int(n_images), 'n_captions': int(n_captions), 'per_image': analyses[0]['per_image'],
            'k': int(analyses[0]['t2i_top'].shape[1]), 'sources': sources,
            'created': time.strftime('%Y-%m-%d %H:%M:%S')}
    if opts.figure:  # checked before anything is written
        text_q, image_q = default_queries(n_images, analyses[0]['per_image'])
        text_q = text_q if opts.queries is None else opts.queries
        image_q = image_q if opts.image_queries is None else opts.image_queries
        for q in text_q:
            if not 0 <= q < n_captions:
                raise UserError(f'--queries {q} is not a caption of the split (0 .. {n_captions - 1})')
        for i in image_q:
            if not 0 <= i < n_images:
                raise UserError(f'--image_queries {i} is not an image of the split (0 .. {n_images - 1})')
        if not text_q and not image_q:
            raise UserError('the figure has no queries: give --queries or --image_queries')
    if opts.out:
        page = write_report(opts.out, meta, analyses, labels, captions, files)
        info(f'wrote {page} ({folder_size(opts.out) / 1e6:.1f} MB in {opts.out})')
    if opts.figure:
        figure = draw_figure(opts.figure, analyses[0], captions, files, text_q, image_q, opts.k)
        info(f'wrote {opts.figure}')
    return {'figure': figure if opts.figure else None, 'analyses': analyses, 'labels': labels, 'meta': meta, 'captions': captions}


if __name__ == '__main__':
    main()

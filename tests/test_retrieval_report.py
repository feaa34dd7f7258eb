"""tools/retrieval_report.py: the report page, opened in a real headless Chromium, shows eval.py's
numbers, each query's top-k with the truth marked (checked against ranks computed here from the
matrix), failures first, and its filters, search and paging work; --compare lists the queries
that changed; --figure writes a PNG / vector PDF.

The browser tests need Chromium and its driver (Debian: apt-get install chromium chromium-driver,
as .ci/run does) and the selenium package; without them they are skipped with that reason."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import eval as eval_tool
from lib.sims_file import save_sims
from test_errors import bert_folder, make_data, precomp, run_main, save_checkpoint
from tools import retrieval_report

N_IMAGES, PER_IMAGE, K = 30, 5, 5
SCREENSHOTS = os.environ.get('REPORT_SCREENSHOTS')  # a folder to keep the screenshots in


def synthetic_sims(seed, n=N_IMAGES, signal=1.2):
    """(n, 5n) scores with the positives raised, so ranks spread from 1 to well past 10."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n, PER_IMAGE * n)).astype(np.float32)
    for i in range(n):
        sims[i, PER_IMAGE * i:PER_IMAGE * (i + 1)] += signal
    return sims


def caption_text(c):
    # distinct words per image, and markup that must be shown as text
    return f'caption {c} shows thing{c // PER_IMAGE} <b>&amp;</b>'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """Two similarity files (A, B) of one split, its captions, and eval.py's JSON for each."""
    root = tmp_path_factory.mktemp('report')
    sims = {'a': synthetic_sims(0), 'b': synthetic_sims(0) + 0.6 * synthetic_sims(1, signal=0)}
    paths = {}
    for name, s in sims.items():
        save_sims(root / f'{name}.npy', s)
        eval_tool.main(['--sims', str(root / f'{name}.npy'), '--json', str(root / f'{name}.json')])
        paths[name] = str(root / f'{name}.npy')
    caps = root / 'test_caps.txt'
    caps.write_text('\n'.join(caption_text(c) for c in range(PER_IMAGE * N_IMAGES)) + '\n')
    evals = {n: json.loads((root / f'{n}.json').read_text())['results'][0] for n in sims}
    return root, sims, paths, str(caps), evals


@pytest.fixture(scope='module')
def report(files):
    root, _, paths, caps, _ = files
    out = root / 'compare'
    retrieval_report.main(['--sims', paths['a'], '--compare', paths['b'], '--captions', caps, '--out', str(out),
                           '--k', str(K)])
    return out / 'index.html'


# ----------------------------------------------------------------------------- independent truth

def t2i_truth_rank(sims, q):
    """1-based rank of caption q's image: 1 + images scoring strictly higher."""
    col = sims[:, q]
    return int((col > col[q // PER_IMAGE]).sum()) + 1


def i2t_truth_rank(sims, i):
    row = sims[i]
    return int((row > row[PER_IMAGE * i:PER_IMAGE * (i + 1)].max()).sum()) + 1


def top(scores, k=K):
    return list(np.argsort(-scores, kind='stable')[:k])


# ----------------------------------------------------------------------------- the browser

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    webdriver = pytest.importorskip('selenium.webdriver', reason='needs selenium (pip install selenium)')
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    driver = shutil.which('chromedriver')
    if not chromium or not driver:
        pytest.skip('needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver; .ci/run '
                    'installs them)')
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
                '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--window-size=1400,1100', f'--user-data-dir={tmp_path_factory.mktemp("chromium")}'):
        options.add_argument(arg)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    try:
        drv = webdriver.Chrome(service=Service(driver), options=options)
    except Exception as err:  # noqa: BLE001 - a browser that cannot start here is a skip, not a failure
        pytest.skip(f'Chromium did not start: {str(err).splitlines()[0]}')
    yield drv
    drv.quit()


def open_page(driver, page):
    """Load the page from disk; -> the console messages of level SEVERE (errors)."""
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get_log('browser')  # drop what an earlier page logged
    driver.get('file://' + str(page))
    WebDriverWait(driver, 20).until(lambda d: d.execute_script('return document.body.dataset.rendered'))
    return [e for e in driver.get_log('browser') if e['level'] == 'SEVERE']


def status(driver):
    return driver.execute_script('var s = document.getElementById("status").dataset;'
                                 'return [+s.matches, +s.page, +s.pages];')


def rows(driver):
    """Each query row shown: (query, truth, [ranks per model], {model: [items]}, {model: [marked items]})."""
    return driver.execute_script('''
        return Array.prototype.map.call(document.querySelectorAll('#results .query'), function (q) {
          var items = {}, marked = {};
          q.querySelectorAll('.tops').forEach(function (t) {
            var cells = t.querySelectorAll('[data-image], [data-caption]');
            items[t.dataset.model] = Array.prototype.map.call(cells, function (c) { return +(c.dataset.image || c.dataset.caption); });
            marked[t.dataset.model] = Array.prototype.filter.call(cells, function (c) { return c.classList.contains('truth'); })
              .map(function (c) { return +(c.dataset.image || c.dataset.caption); });
          });
          q.querySelectorAll('.tops [data-truth-image]').forEach(function (t) {
            marked['ref' + t.parentNode.dataset.model] = +t.dataset.truthImage; });
          var ranks = Array.prototype.map.call(q.querySelectorAll('.qhead .rank'), function (r) { return +r.dataset.rank; });
          return [+q.dataset.query, +q.dataset.truth, ranks, items, marked, q.querySelector('.qhead').textContent];
        });''')


def choose(driver, select_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    Select(driver.find_element(By.ID, select_id)).select_by_value(value)


def click(driver, element_id):
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, element_id).click()


def screenshot(driver, tmp_path, name):
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert cv2.imread(str(path)) is not None
    if SCREENSHOTS:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        shutil.copy(path, os.path.join(SCREENSHOTS, name))
    return path


# ----------------------------------------------------------------------------- tests

def test_loads_from_disk_without_console_errors_or_network(browser, report, tmp_path):
    assert open_page(browser, report) == []
    # everything the page loads is a file next to it (or inline data)
    refs = browser.execute_script('return Array.prototype.map.call(document.querySelectorAll("[src], [href]"),'
                                  ' function (e) { return e.src || e.href; })')
    assert refs and all(r.startswith(('file://', 'data:')) for r in refs), refs
    for name in ('index.html', 'report_data.js'):
        text = (report.parent / name).read_text()
        assert 'http://' not in text and 'https://' not in text
    screenshot(browser, tmp_path, 'report_compare.png')


def test_summary_numbers_are_eval_py_s(browser, report, files):
    _, _, _, _, evals = files
    open_page(browser, report)
    shown = browser.execute_script('''
        var out = {};
        document.querySelectorAll('table.metrics tr[data-row]').forEach(function (tr) {
          var r = out[tr.dataset.row] = {};
          tr.querySelectorAll('td[data-metric]').forEach(function (td) { r[td.dataset.metric] = td.textContent; });
        });
        return out;''')
    assert set(shown) == {'a', 'b', 'diff'}
    for row, values in (('a', evals['a']), ('b', evals['b'])):
        for side in ('i2t', 't2i'):
            for m, v in values[side].items():
                assert shown[row][f'{side}_{m}'] == (f'{v:.1f}' if m == 'medr' else f'{v:.2f}'), (row, side, m)
        assert shown[row]['rsum'] == f'{values["rsum"]:.2f}'
    for side in ('i2t', 't2i'):
        for m in evals['a'][side]:
            assert shown['diff'][f'{side}_{m}'] == f'{evals["b"][side][m] - evals["a"][side][m]:+.2f}'
    assert shown['diff']['rsum'] == f'{evals["b"]["rsum"] - evals["a"]["rsum"]:+.2f}'


def test_text_to_image_top_k_and_truth_marked_failures_first(browser, report, files):
    _, sims, _, _, _ = files
    open_page(browser, report)
    shown = rows(browser)
    assert len(shown) == 50
    ranks_a = [t2i_truth_rank(sims['a'], q) for q in range(PER_IMAGE * N_IMAGES)]
    # failures first: the worst 50 ranks of A, worst first, ties in query order
    expected = sorted(range(len(ranks_a)), key=lambda q: (-ranks_a[q], q))[:50]
    assert [r[0] for r in shown] == expected
    for q, truth, ranks, items, marked, head in shown:
        assert truth == q // PER_IMAGE
        assert ranks == [t2i_truth_rank(sims['a'], q), t2i_truth_rank(sims['b'], q)]
        for m, name in (('0', 'a'), ('1', 'b')):
            assert items[m] == top(sims[name][:, q])
            assert marked[m] == [i for i in items[m] if i == truth]
            # past the top k, the truth is shown after it for reference
            assert marked.get('ref' + m) == (truth if truth not in items[m] else None)
        assert f'caption {q} shows thing{q // PER_IMAGE} <b>&amp;</b>' in head  # markup shown as text


def test_image_to_text_top_k_and_right_captions_marked(browser, report, files, tmp_path):
    _, sims, _, _, _ = files
    open_page(browser, report)
    click(browser, 'view-i2t')
    shown = rows(browser)
    assert len(shown) == N_IMAGES and status(browser) == [N_IMAGES, 1, 1]
    ranks = [i2t_truth_rank(sims['a'], i) for i in range(N_IMAGES)]
    assert [r[0] for r in shown] == sorted(range(N_IMAGES), key=lambda i: (-ranks[i], i))
    for i, truth, rk, items, marked, _ in shown:
        assert truth == i and rk == [i2t_truth_rank(sims['a'], i), i2t_truth_rank(sims['b'], i)]
        for m, name in (('0', 'a'), ('1', 'b')):
            assert items[m] == top(sims[name][i])
            assert marked[m] == [c for c in items[m] if c // PER_IMAGE == i]
    screenshot(browser, tmp_path, 'report_i2t.png')


def test_rank_filters_and_paging(browser, report, files):
    _, sims, _, _, _ = files
    open_page(browser, report)
    n = PER_IMAGE * N_IMAGES
    ranks = np.array([t2i_truth_rank(sims['a'], q) for q in range(n)])
    assert status(browser) == [n, 1, 3]
    for k in (1, 5, 10):
        choose(browser, 'filter', str(k))
        misses = int((ranks > k).sum())
        assert status(browser)[0] == misses
        assert all(r[2][0] > k for r in rows(browser))
    choose(browser, 'filter', '0')
    choose(browser, 'sort', 'index')
    seen = []
    for page in (1, 2, 3):
        assert status(browser)[1:] == [page, 3]
        seen += [r[0] for r in rows(browser)]
        if page < 3:
            click(browser, 'next')
    assert seen == list(range(n))  # every query exactly once, in order
    assert browser.execute_script('return document.getElementById("next").disabled')
    click(browser, 'prev')
    assert status(browser)[1] == 2
    choose(browser, 'pagesize', '25')
    assert status(browser)[1:] == [1, 6] and len(rows(browser)) == 25


def test_search_box_filters_by_text(browser, report):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    open_page(browser, report)
    box = browser.find_element(By.ID, 'search')
    box.send_keys('THING7 ')  # case-insensitive, surrounding spaces ignored
    WebDriverWait(browser, 5).until(lambda d: status(d)[0] == PER_IMAGE)
    assert sorted(r[0] for r in rows(browser)) == list(range(7 * PER_IMAGE, 8 * PER_IMAGE))
    box.clear()
    box.send_keys('no such words')
    WebDriverWait(browser, 5).until(lambda d: status(d)[0] == 0)
    assert rows(browser) == []


def test_compare_lists_the_queries_that_changed(browser, report, files):
    _, sims, _, _, _ = files
    open_page(browser, report)
    n = PER_IMAGE * N_IMAGES
    a = np.array([t2i_truth_rank(sims['a'], q) for q in range(n)])
    b = np.array([t2i_truth_rank(sims['b'], q) for q in range(n)])
    counts = browser.execute_script('var o = {}; document.querySelectorAll("[data-count]").forEach(function (s) {'
                                    ' o[s.dataset.count] = +s.textContent; }); return o;')
    assert counts['t2i-b_better'] == (b < a).sum() and counts['t2i-a_better'] == (a < b).sum()
    assert counts['t2i-same'] == (a == b).sum()
    choose(browser, 'pagesize', '100')
    choose(browser, 'sort', 'index')
    for change, expected in (('b', b < a), ('a', a < b), ('changed', a != b)):
        choose(browser, 'change', change)
        assert status(browser)[0] == expected.sum()
        assert sorted(r[0] for r in rows(browser)) == sorted(np.flatnonzero(expected).tolist())[:100]
    choose(browser, 'change', 'b')
    choose(browser, 'sort', 'gain')
    gains = [r[2][0] - r[2][1] for r in rows(browser)]
    assert gains == sorted(gains, reverse=True) and gains[0] == (a - b).max()
    assert all(f'B better by {g}' in r[5] for g, r in zip(gains, rows(browser)))


def test_thumbnails_from_image_dir(browser, files, tmp_path):
    """With --image_dir (sorted file names), every image is a thumbnail the page shows."""
    root, _, paths, caps, _ = files
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(N_IMAGES):
        cv2.imwrite(str(images / f'{i:03d}.png'), np.full((40 + i, 60, 3), (10 * i, 100, 200), np.uint8))
    out = tmp_path / 'single'
    retrieval_report.main(['--sims', paths['a'], '--captions', caps, '--image_dir', str(images), '--out', str(out)])
    assert sorted(os.listdir(out / 'thumbs')) == [f'{i:05d}.jpg' for i in range(N_IMAGES)]
    assert open_page(browser, out / 'index.html') == []
    loaded = browser.execute_script('''
        var imgs = document.querySelectorAll('#results img');
        return Promise.all(Array.prototype.map.call(imgs, function (im) { im.loading = 'eager'; return im.decode().then(
          function () { return im.naturalWidth; }, function () { return 0; }); }));''')
    assert len(loaded) >= 50 * K and min(loaded) == retrieval_report.THUMB
    assert browser.execute_script('return document.querySelectorAll("#results .cell[data-image] img").length') == 50 * K
    assert browser.execute_script('return document.querySelectorAll("#model-label:not([hidden])").length') == 0
    screenshot(browser, tmp_path, 'report_thumbs.png')


def test_checkpoints_report_eval_py_s_numbers(tmp_path, capsys):
    """--checkpoint / --compare go through eval.py's own path: the same metrics as eval.py --json."""
    make_data(tmp_path, eval_images=6)
    bert = bert_folder(tmp_path / 'bert')
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(save_checkpoint(tmp_path / f'm{seed}.pth', tmp_path, bert))
    expected = []
    for i, ck in enumerate(ckpts):
        eval_tool.main(['--checkpoint', ck, '--device', 'cpu', '--json', str(tmp_path / f'e{i}.json')])
        expected.append(json.loads((tmp_path / f'e{i}.json').read_text())['results'])
    got = retrieval_report.main(['--checkpoint', ckpts[0], '--compare', ckpts[1], '--device', 'cpu',
                                 '--out', str(tmp_path / 'rep')])
    assert [a['results'] for a in got['analyses']] == expected
    assert got['meta']['split'] == 'test' and got['labels'] == ['m0', 'm1']
    assert got['captions'] == open(precomp(tmp_path, 'test_caps.txt')).read().splitlines()
    page = (tmp_path / 'rep' / 'index.html').read_text()
    assert f'{expected[0][0]["rsum"]:.2f}' in page and f'{expected[1][0]["rsum"] - expected[0][0]["rsum"]:+.2f}' in page


def test_figure_png_and_vector_pdf(files, tmp_path):
    root, _, paths, caps, _ = files
    png, pdf = tmp_path / 'fig.png', tmp_path / 'fig.pdf'
    sims = files[1]['a']
    drawn = retrieval_report.main(['--sims', paths['a'], '--captions', caps, '--figure', str(png), '--queries', '0',
                                   '12', '--image_queries', '3'])['figure']
    assert [d[:2] for d in drawn] == [('caption', 0), ('caption', 12), ('image', 3)]
    for kind, q, items, marked in drawn:  # against the ranking computed here
        if kind == 'caption':
            assert items == top(sims[:, q]) and marked == [i for i in items if i == q // PER_IMAGE]
        else:
            assert items == top(sims[q]) and marked == [c for c in items if c // PER_IMAGE == q]
    assert any(marked for *_, marked in drawn)
    image = cv2.imread(str(png))
    assert image is not None and image.shape[1] <= 1600
    # the truth frame is drawn in green (#1a9c3a): present where a truth is in the top k
    assert ((image[:, :, 1] > 140) & (image[:, :, 2] < 60) & (image[:, :, 0] < 80)).sum() > 100
    retrieval_report.main(['--sims', paths['a'], '--captions', caps, '--figure', str(pdf), '--image_queries'])
    data = pdf.read_bytes()
    assert data.startswith(b'%PDF') and b'/FontFile2' in data  # text as embedded TrueType: vector, selectable


@pytest.mark.parametrize('case', ['missing_captions', 'too_few_captions', 'shapes_differ', 'no_caption_source',
                                  'query_outside'])
def test_errors_name_the_file_and_the_fix(files, tmp_path, capsys, case):
    root, _, paths, caps, _ = files
    argv = ['--sims', paths['a'], '--captions', caps, '--out', str(tmp_path / 'r')]
    if case == 'missing_captions':
        argv[3], fragment = str(tmp_path / 'nope_caps.txt'), 'nope_caps.txt does not exist; pass'
    elif case == 'too_few_captions':
        short = tmp_path / 'short_caps.txt'
        short.write_text('one\ntwo\n')
        argv[3], fragment = str(short), 'has 2 captions but the similarities have 150 columns'
    elif case == 'shapes_differ':
        save_sims(tmp_path / 'small.npy', synthetic_sims(0, n=4))
        argv += ['--compare', str(tmp_path / 'small.npy')]
        fragment = 'different shapes'
    elif case == 'no_caption_source':
        argv = ['--sims', paths['a'], '--out', str(tmp_path / 'r')]
        fragment = '--sims needs the split\'s captions: pass --captions'
    else:
        argv += ['--figure', str(tmp_path / 'f.png'), '--queries', '150']
        fragment = '--queries 150 is not a caption of the split (0 .. 149)'
    code, err = run_main(retrieval_report.main, argv, capsys)
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err

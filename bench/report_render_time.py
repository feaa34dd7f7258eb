"""Time the first page of a COCO-sized retrieval report (5000 images, 25,000 captions, synthetic
scores) in headless Chromium, and report the folder's size.

    python bench/report_render_time.py [--out /tmp/coco_report] [--runs 5]

Needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver) and selenium.
The time is what the page itself measures: from the navigation's start (performance.now() = 0)
to the end of its first render (the data script parsed, the queries sorted failures first, the
first 50 queries in the DOM), and to just after the next animation frame (laid out and
painted); the median of --runs
cold loads, each in a fresh tab of one browser.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import arguments  # noqa: E402
from tools import retrieval_report as rr  # noqa: E402

WORDS = ('a man woman dog cat plate of food on a table next to the street with two people riding bikes in '
         'a park near some trees while a red bus drives by the white building and child holds kite').split()


def coco_like(n_images=5000, per_image=5, seed=0):
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, per_image * n_images), dtype=np.float32)
    own = np.repeat(np.arange(n_images), per_image)
    sims[own, np.arange(per_image * n_images)] += 3.0  # R@1 of a few tens of percent
    captions = [' '.join(rng.choice(WORDS, int(rng.integers(8, 16)))) for _ in range(per_image * n_images)]
    return sims, captions


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=arguments.HelpFormatter)
    p.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'coco_sized_report'), help='report folder')
    p.add_argument('--runs', type=int, default=5, help='page loads timed')
    args = p.parse_args(argv)
    t0 = time.time()
    sims, captions = coco_like()
    a = rr.analyse(sims, 5)
    meta = {'title': 'COCO-sized synthetic report', 'dataset': 'synthetic', 'split': 'testall', 'n_images': 5000,
            'n_captions': 25000, 'per_image': 5, 'k': 5, 'sources': ['synthetic'], 'created': ''}
    page = rr.write_report(args.out, meta, [a], ['synthetic'], captions, None)
    print(f'report written in {time.time() - t0:.1f} s: {page}')
    for name in sorted(os.listdir(args.out)):
        print(f'  {name}: {os.path.getsize(os.path.join(args.out, name)) / 1e6:.2f} MB')
    print(f'folder: {rr.folder_size(args.out) / 1e6:.2f} MB')

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which('chromium')
    profile = tempfile.mkdtemp()
    for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
                '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync',
                '--window-size=1400,1000', f'--user-data-dir={profile}'):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which('chromedriver')), options=options)
    rendered, painted, wall = [], [], []
    try:
        for _ in range(args.runs):
            driver.switch_to.new_window('tab')
            start = time.perf_counter()
            driver.get('file://' + os.path.abspath(page))
            WebDriverWait(driver, 60).until(lambda d: d.execute_script('return document.body.dataset.rendered'))
            wall.append(time.perf_counter() - start)
            rendered.append(driver.execute_script('return window.REPORT_FIRST_PAGE_MS') / 1000)
            WebDriverWait(driver, 60).until(lambda d: d.execute_script('return window.REPORT_FIRST_PAINT_MS'))
            painted.append(driver.execute_script('return window.REPORT_FIRST_PAINT_MS') / 1000)
            shown = driver.execute_script('return document.querySelectorAll("#results .query").length')
            assert shown == 50, shown
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f'first page rendered: median {statistics.median(rendered):.2f} s (runs: '
          f'{", ".join(f"{x:.2f}" for x in rendered)}); painted (next frame): median {statistics.median(painted):.2f} s; '
          f'driver.get to rendered: median {statistics.median(wall):.2f} s')


if __name__ == '__main__':
    main()

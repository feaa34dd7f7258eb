#!/usr/bin/env bash
# One command for a CUDA machine: the GPU-only tests, then the GPU benchmark, into one JSON file.
#
#   bash bench/gpu_check.sh [OUT.json]        (default: bench/gpu_check.json)
#
# 1. python -m pytest -m cuda: fp16 and bf16 training steps (grad scaler, non-finite skip), a run
#    on CUDA evaluated on CPU (to 1e-4), one torchrun nccl process with SyncBatchNorm, --compile,
#    --tf32 (tests/test_cuda.py);
# 2. bench/bench.py at BERT-base sizes, batch 128: the training step in fp32, bf16 and fp16 (step
#    time, samples/s, peak memory), --compile beside eager in bf16, the COCO-5K ranking, the FLOPs
#    table in fp32 and bf16 (a step's FLOPs, achieved rate, the GPU's measured matrix-product peak,
#    the loader's samples/s beside the step's) and the memory per part at the paper's Flickr30K
#    and COCO settings (batch 128 and 256, captions padded to 80 word pieces), each beside CUDA's
#    max allocated bytes.
# Without a CUDA GPU it says so and exits 0 (the cuda tests are skipped by the CPU suite).
# Exit status: 0 when every test passed, 1 otherwise (the JSON file is written either way).
set -uo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then  # print the header above, run nothing
  sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
OUT=${1:-bench/gpu_check.json}
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no CUDA GPU is visible to torch on this machine; nothing to check (the CPU suite: python -m pytest -q)"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

echo "gpu_check: 1/2 the cuda tests" >&2
"$PYTHON" -m pytest -m cuda -q -rs --junitxml "$TMP/tests.xml" >&2
TESTS_RC=$?

echo "gpu_check: 2/2 the benchmark" >&2
BENCH_RC=0
for precision in fp32 bf16 fp16; do
    "$PYTHON" bench/bench.py --parts step --text bert-base --batch_size 128 --precision "$precision" \
        --out "$TMP/step_$precision.json" >/dev/null || BENCH_RC=1
done
"$PYTHON" bench/bench.py --parts compile --text bert-base --batch_size 128 --precision bf16 \
    --out "$TMP/compile.json" >/dev/null || BENCH_RC=1
"$PYTHON" bench/bench.py --parts eval --out "$TMP/eval.json" >/dev/null || BENCH_RC=1
for precision in fp32 bf16; do
    "$PYTHON" bench/bench.py --parts flops --text bert-base --batch_size 128 --tokens 80 --precision "$precision" \
        --out "$TMP/flops_$precision.json" >/dev/null || BENCH_RC=1
done
for batch in 128 256; do
    "$PYTHON" bench/bench.py --parts memory --text bert-base --batch_size "$batch" --tokens 80 \
        --out "$TMP/memory_$batch.json" >/dev/null || BENCH_RC=1
done

"$PYTHON" - "$TMP" "$OUT" "$TESTS_RC" "$BENCH_RC" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
tmp, out, tests_rc, bench_rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def read(name):
    path = os.path.join(tmp, name)
    return json.load(open(path)) if os.path.exists(path) else None

tests = {'exit_code': tests_rc}
if os.path.exists(os.path.join(tmp, 'tests.xml')):
    suite = ET.parse(os.path.join(tmp, 'tests.xml')).getroot()
    suite = suite if suite.tag == 'testsuite' else suite.find('testsuite')
    tests.update({k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')})
    tests['cases'] = {c.get('name'): ('failed' if c.find('failure') is not None or c.find('error') is not None
                                      else 'skipped' if c.find('skipped') is not None else 'passed')
                      for c in suite.iter('testcase')}
parts = {name: read(f'{name}.json') for name in ('step_fp32', 'step_bf16', 'step_fp16', 'compile', 'eval',
                                                 'flops_fp32', 'flops_bf16', 'memory_128', 'memory_256')}
first = next((p for p in parts.values() if p), {})
report = {'machine': first.get('machine'), 'tests': tests, 'bench_exit_code': bench_rc,
          'step': {k[5:]: p['results']['step'] for k, p in parts.items() if k.startswith('step_') and p},
          'compile': parts['compile'] and parts['compile']['results']['compile'],
          'eval': parts['eval'] and parts['eval']['results']['eval'],
          'flops': {k[6:]: p['results']['flops'] for k, p in parts.items() if k.startswith('flops_') and p},
          'memory': {'batch_' + k[7:]: p['results']['memory'] for k, p in parts.items() if k.startswith('memory_') and p}}
with open(out, 'w') as f:
    json.dump(report, f, indent=1)
for precision, r in report['step'].items():
    print(f"step {precision}: {r['step_s']['ours']:.3f} s, {r['samples_per_s']['ours']:.0f} samples/s, "
          f"peak {r['peak_memory_mb'] / 1024:.1f} GiB")
for precision, r in report['flops'].items():
    print(f"flops {precision}: {r['step_flops'] / 1e12:.2f} TFLOP per step, {r['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s "
          f"of a measured {r['matmul_peak_flops_per_s'] / 1e12:.1f} ({r['achieved_over_peak']:.0%}); step "
          f"{r['step_samples_per_s']:.0f} samples/s, loader {r['loader_samples_per_s']:.0f}: limited by {r['limited_by']}")
for batch, r in report['memory'].items():
    for variant, v in r['variants'].items():
        cuda = v['cuda_max_allocated_bytes']
        print(f"memory {batch} {variant}: peak {v['peak_bytes'] / 2**30:.2f} GiB counted"
              + (f", {cuda / 2**30:.2f} GiB CUDA max allocated" if cuda is not None else ''))
print('tests: ' + ', '.join(f'{k} {v}' for k, v in tests.items() if k != 'cases'))
print(f'wrote {out}')
EOF
[ "$TESTS_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]

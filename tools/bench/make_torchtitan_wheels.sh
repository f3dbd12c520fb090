#!/usr/bin/env bash
# Fill ./.whl-tt (run from the project root, on the CPU machine) with torchtitan 0.2.2 (the newest release that
# runs on torch 2.11) and what it imports that the GPU image lacks, for `bench_throughput.py --baselines
# torchtitan` there. Carry .whl-tt with .whl; throughput_gpu.sh's `setup` installs both into /tmp/site.
# torchtitan's model package imports its data loaders, hence `datasets` (and its pure-Python needs) and `tyro`
# (config). pyarrow, which `datasets` also needs, is left out (55 MB: with .cute-b it would pass the 64 MiB a
# call may carry): the GPU image brings it; if an import still fails there, add the module's wheel to EXTRA.
set -euo pipefail
TT=${TT:-0.2.2}
WHEELS="torchtitan==$TT torchdata datasets tyro tomli einops docstring-parser typeguard shtab dill multiprocess xxhash ${EXTRA:-}"
mkdir -p .whl-tt
grep -qx '/.whl-tt/' .git/info/exclude 2>/dev/null || echo '/.whl-tt/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl-tt $WHEELS
du -sh .whl-tt; ls -1 .whl-tt

#!/usr/bin/env bash
# Install Triton's perf_analyzer into DIR (default .perf_analyzer) and write DIR/perf_analyzer, a
# wrapper that finds its libraries. PyPI's `perf-analyzer` package is an empty placeholder; the
# real binary ships inside the tritonclient 2.51 wheel (newer ones need glibc >= 2.38). It needs
# Debian's libb64 and libcudart (loaded even on the CPU), which nvidia-cuda-runtime-cu12 carries.
#
#   bash bench/install_perf_analyzer.sh [DIR]   then   DIR/perf_analyzer -m digits -u localhost:8001 ...
set -euo pipefail
dir="$(realpath -m "${1:-.perf_analyzer}")"
mkdir -p "$dir"
if [ ! -x "$dir/bin/perf_analyzer" ]; then
  python -m pip download -q --no-deps tritonclient==2.51.0 -d "$dir/dl"
  python -m zipfile -e "$dir"/dl/tritonclient-2.51.0-*.whl "$dir/dl/x"
  mkdir -p "$dir/bin" && cp "$dir/dl/x/tritonclient-2.51.0.data/data/bin/perf_analyzer" "$dir/bin/" && chmod +x "$dir/bin/perf_analyzer"
  rm -rf "$dir/dl"
fi
if ! ldconfig -p | grep -q libb64.so.0d; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq libb64-0d || (apt-get update -qq && apt-get install -y -qq libb64-0d)) >/dev/null 2>&1
  else
    echo "install_perf_analyzer: needs Debian's libb64-0d (apt-get install libb64-0d)" >&2
    exit 1
  fi
fi
if [ ! -d "$dir/venv" ]; then
  python -m venv "$dir/venv" && "$dir/venv/bin/pip" install -q nvidia-cuda-runtime-cu12
fi
lib="$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib | head -1)"
cat > "$dir/perf_analyzer" <<WRAPPER
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$lib:\${LD_LIBRARY_PATH:-}"
exec "$dir/bin/perf_analyzer" "\$@"
WRAPPER
chmod +x "$dir/perf_analyzer"
"$dir/perf_analyzer" --version >/dev/null 2>&1 || "$dir/perf_analyzer" --help >/dev/null 2>&1 || true
echo "$dir/perf_analyzer"

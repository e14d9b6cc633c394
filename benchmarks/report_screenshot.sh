#!/usr/bin/env bash
# docs/report.png: the bundled example's `select --report` page as headless Chromium draws it at a
# desktop width (1280 px). Usage, from anywhere, alfk's venv active: benchmarks/report_screenshot.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome) ||
  { echo "error: no chromium on PATH (apt-get install chromium)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
python "$repo/examples/make_biased_folders.py" --out example --force >/dev/null
alfk select --val example/val --pool example/unlabeled --P 12 --seed 0 --workdir w --no-ledger \
  --report report.html -q >/dev/null
sandbox=()
[ "$(id -u)" -ne 0 ] || sandbox=(--no-sandbox)  # Chromium's sandbox refuses root
timeout 60 "$browser" --headless --disable-gpu "${sandbox[@]}" --hide-scrollbars \
  --force-device-scale-factor=1 --user-data-dir="$tmp/profile" --window-size=1280,1400 \
  --screenshot="$repo/docs/report.png" "file://$tmp/report.html" 2>/dev/null
echo "wrote $repo/docs/report.png"

#!/usr/bin/env bash
# Render an HTML file to a PNG screenshot with headless Chromium.
#
#   scripts/render_html.sh PAGE.html OUT.png [WIDTH [HEIGHT]]
#
# WIDTH x HEIGHT is the browser window (default 1400 x 1800); the screenshot
# is that window, from the top of the page. Chromium is looked up as
# $CHROMIUM, then chromium, chromium-browser, google-chrome on PATH
# (Debian/Ubuntu: `apt-get install -y chromium`). Exit status 2: no Chromium;
# 1: no such page, or Chromium wrote no PNG. Prints the PNG's path.
#
# Used by tests/attnres_compile/report/test_diff_in_browser.py to look at the page
# that `attnres_compile.diff.diff_html` writes.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
fi
page=$1
out=$2
width=${3:-1400}
height=${4:-1800}

browser=${CHROMIUM:-}
if [[ -z "$browser" ]]; then
    for candidate in chromium chromium-browser google-chrome; do
        if command -v "$candidate" >/dev/null 2>&1; then
            browser=$candidate
            break
        fi
    done
fi
if [[ -z "$browser" ]]; then
    echo "render_html.sh: no chromium, chromium-browser or google-chrome on PATH" >&2
    exit 2
fi

if [[ ! -f "$page" ]]; then
    echo "render_html.sh: no such file: $page" >&2
    exit 1
fi

page_path=$(cd "$(dirname "$page")" && pwd)/$(basename "$page")
out_path=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
# A throwaway profile: a shared one can be locked by another Chromium, and root needs --no-sandbox.
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out_path"

timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
    --no-first-run --no-default-browser-check --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$width,$height" \
    --screenshot="$out_path" "file://$page_path" >/dev/null 2>&1 || true

if [[ ! -s "$out_path" ]]; then
    echo "render_html.sh: $browser wrote no screenshot for $page_path" >&2
    exit 1
fi
echo "$out_path"

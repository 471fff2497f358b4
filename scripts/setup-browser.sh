#!/usr/bin/env bash
# Headless Chromium (Debian's) and playwright-core (npm, no browser download) for the browser tests.
# Idempotent: does nothing when both are there. apt-get needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=.venv/browser   # inside .venv: git-ignored, and removed with the environment
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
if [ ! -f "$PREFIX/node_modules/playwright-core/package.json" ]; then
    mkdir -p "$PREFIX"
    # playwright-core never downloads a browser; the tests launch /usr/bin/chromium.
    npm install --silent --no-audit --no-fund --prefix "$PREFIX" playwright-core@1 >/dev/null
fi
echo "chromium: $(command -v chromium); playwright-core: $PREFIX/node_modules/playwright-core" >&2

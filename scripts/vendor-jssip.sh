#!/usr/bin/env bash
# Reproduce the vendored JsSIP (web/vendor/jssip/jssip.min.js, which ivr311 embeds and serves at
# /console/assets/jssip.min.js) from the npm registry: the version pinned in
# web/vendor/jssip/package.json, installed with `npm ci` from package-lock.json (npm checks each
# package's integrity hash), and the file copied as JsSIP's authors built it
# (dist/jssip.min.js, with its MIT licence): no build step here.
#
#   scripts/vendor-jssip.sh           # write the copy (after changing the pinned version)
#   scripts/vendor-jssip.sh --check   # exit 1 unless the committed copy is the registry's
set -euo pipefail
cd "$(dirname "$0")/../web/vendor/jssip"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp package.json package-lock.json "$tmp/"
(cd "$tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
src="$tmp/node_modules/jssip"
if [ "${1:-}" = --check ]; then
  cmp -s "$src/dist/jssip.min.js" jssip.min.js && cmp -s "$src/LICENSE" LICENSE || {
    echo "web/vendor/jssip differs from jssip $(node -p "require('$src/package.json').version") on the registry" >&2
    exit 1
  }
  echo "web/vendor/jssip matches the registry's jssip"
  exit 0
fi
cp "$src/dist/jssip.min.js" jssip.min.js
cp "$src/LICENSE" LICENSE
sha256sum jssip.min.js

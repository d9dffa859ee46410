#!/usr/bin/env bash
# Rebuilds controller/web/vendor/ from the pinned npm packages (package-lock.json): run it after
# changing package.json, review the diff, commit. The controller embeds vendor/ at build time,
# so neither CI nor the console's browsers need npm or a CDN.
set -euo pipefail
cd "$(dirname "$0")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp package.json "$work/"
if [ -f package-lock.json ]; then cp package-lock.json "$work/"; fi
# `npm install` keeps to package-lock.json while it matches package.json and updates it when
# package.json changed (a new pin); no install scripts run.
(cd "$work" && npm install --ignore-scripts --no-audit --no-fund)
cp "$work/package-lock.json" package-lock.json
out=vendor
rm -rf "$out" && mkdir -p "$out"
m="$work/node_modules"
cp "$m/protobufjs/dist/protobuf.min.js" "$out/protobuf.min.js"
cp "$m/protobufjs/LICENSE" "$out/protobufjs.LICENSE"
cp "$m/@xterm/xterm/lib/xterm.js" "$out/xterm.js"
cp "$m/@xterm/xterm/css/xterm.css" "$out/xterm.css"
cp "$m/@xterm/xterm/LICENSE" "$out/xterm.LICENSE"
# noVNC ships ES modules (with a top-level await): one minified module that hands RFB to
# console.js as window.RFB.
printf 'import RFB from "@novnc/novnc";\nwindow.RFB = RFB;\n' > "$work/novnc-entry.js"
"$m/.bin/esbuild" "$work/novnc-entry.js" --bundle --format=esm --minify --target=es2022 \
  --legal-comments=none --log-level=warning --outfile="$out/novnc.js"
cp "$m/@novnc/novnc/LICENSE.txt" "$out/novnc.LICENSE"
(cd "$out" && sha256sum -- * > SHA256SUMS)
echo "vendored into $(pwd)/$out:"
cat "$out/SHA256SUMS"

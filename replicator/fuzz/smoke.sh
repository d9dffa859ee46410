#!/usr/bin/env bash
# Short, bounded fuzz run for CI: builds the two targets and fuzzes each for FUZZ_SECONDS
# (default 15, so at most ~30 s of fuzzing; the first build takes ~2.5 min more on 2 cores).
# Works on stable Rust through RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z sanitizer flags).
# New corpus entries go to a temporary directory, so the committed seeds stay untouched;
# a crash leaves its input in fuzz/artifacts/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-15}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz smoke: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

cargo fuzz build
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p artifacts
for target in decode link_receive; do
  mkdir -p "$work/$target" "artifacts/$target"
  echo "fuzz smoke: $target for ${seconds}s"
  if ! cargo fuzz run "$target" "$work/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=1024 -artifact_prefix="artifacts/$target/" \
    -print_final_stats=1 >"$work/$target.log" 2>&1; then
    tail -n 80 "$work/$target.log"
    echo "fuzz smoke: $target FAILED (input kept in replicator/fuzz/artifacts/$target/)"
    exit 1
  fi
  grep -E '^(Done|stat::(number_of_executed_units|new_units_added|peak_rss_mb))' "$work/$target.log" || true
done
echo "fuzz smoke: passed"

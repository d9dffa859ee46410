#!/usr/bin/env bash
# Runs every check and test on this machine (as root): installs missing system packages, then
# formatting, lints, docs, unit and integration tests, a short fuzz run, and the end-to-end
# tests that boot real QEMU guests in network namespaces. PV_SKIP_E2E=1 skips the latter.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
started=$(date +%s)
phase() { echo "== $* ($(($(date +%s) - started)) s)"; }

phase "system packages"
bash scripts/install-deps.sh
phase "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
phase "build"
cargo build --workspace --all-targets
phase "unit and integration tests"
cargo test --workspace --exclude tests
phase "fuzz smoke (bounded run of the A-Link decoder and receive path)"
bash replicator/fuzz/smoke.sh
phase "end-to-end tests (labs run one at a time)"
cargo test -p tests -- --test-threads=1
phase "all tests passed"

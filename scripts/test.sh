#!/usr/bin/env bash
# The project's test command: formatting, lints, unit and golden tests, then the
# end-to-end suite against real QEMU 10.0.2. Prints a summary with pass/skip counts.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*"; }

if [ "$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p')" != "10.0.2" ] \
   || ! python3 -c 'import pytest, qemu.qmp' 2>/dev/null \
   || ! dpkg -s zlib1g-dev libzstd-dev pkg-config openssl >/dev/null 2>&1; then
  step "installing test dependencies"
  scripts/install-deps.sh
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test (unit, golden, hostile-stream tests)"
cargo test --workspace 2>&1 | tee target/cargo-test.log | grep -E '^(test result|SKIP|running [0-9]+ tests? )|FAILED|panicked' || true
if grep -q 'test result: FAILED\|error\[' target/cargo-test.log || ! grep -q 'test result: ok' target/cargo-test.log; then
  echo "cargo test failed; see target/cargo-test.log"
  tail -50 target/cargo-test.log
  exit 1
fi

step "fuzz smoke run (every target a few seconds; builds with the nightly toolchain)"
scripts/fuzz.sh "${FUZZ_SMOKE_SECONDS:-2}"

step "build release binary"
cargo build --release --bin vmigrate

step "end-to-end tests against QEMU (pytest)"
VMIGRATE_BIN="$PWD/target/release/vmigrate" python3 -m pytest tests/e2e -ra -q

step "summary"
echo "cargo test: $(grep -c 'test result: ok' target/cargo-test.log) suites ok, skipped: $(grep -c '^SKIP' target/cargo-test.log || true)"
echo "all tests passed"

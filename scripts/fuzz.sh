#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ (libFuzzer, nightly toolchain) and runs each for
# SECONDS (default 60), then prints executions, coverage (libFuzzer's cov: and ft:)
# and crashes per target, with each process's peak RSS. Exits non-zero when a target
# does not build or crashes.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Environment: FUZZ_ASAN=1 builds with AddressSanitizer; FUZZ_JOBS=N runs N targets
# at once; FUZZ_RSS_MB caps each process's memory (default 1024: an input that makes
# a decoder allocate past it is reported as a crash, "oom").
# Inputs that crash are kept in fuzz/artifacts/TARGET/; the corpus grows in
# fuzz/target/corpus/TARGET (the seeds in fuzz/corpus/TARGET are not modified).
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
all_targets=(load_stream mapped_ram inspect multifd return_path postcopy qmp hmp options x509_name colo)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: SKIPPED: the nightly toolchain is not installed (rustup toolchain install nightly)"
  exit 0
fi

host="$(rustc +nightly -vV | sed -n 's/^host: //p')"
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
flags+=" -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares"
flags+=" --cfg fuzzing -Cdebug-assertions -Copt-level=1"
if [ "${FUZZ_ASAN:-0}" = 1 ]; then
  flags+=" -Zsanitizer=address"
fi

t0=$(date +%s)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
# --target keeps the instrumentation off build scripts and proc macros.
if ! RUSTFLAGS="$flags" cargo +nightly build --release --target "$host" "${bins[@]}"; then
  echo "fuzz: FAILED: the fuzz targets do not build"
  exit 1
fi
echo "fuzz: built ${#targets[@]} targets in $(( $(date +%s) - t0 )) s"

bin_dir="${CARGO_TARGET_DIR:-target}/$host/release"
work="target/corpus"
mkdir -p "$work" artifacts
run_one() {
  local t="$1"
  mkdir -p "$work/$t" "artifacts/$t"
  [ -d "corpus/$t" ] && cp -n corpus/"$t"/* "$work/$t/" 2>/dev/null
  local before after
  before=$(ls "artifacts/$t" | wc -l)
  "$bin_dir/$t" -max_total_time="$secs" -timeout=25 -rss_limit_mb="${FUZZ_RSS_MB:-1024}" \
    -dict=stream.dict -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
    "$work/$t" >"$work/$t.log" 2>&1
  local rc=$?
  after=$(ls "artifacts/$t" | wc -l)
  local last execs cov ft rss
  last=$(grep -E '^#[0-9]+' "$work/$t.log" | tail -1)
  rss=$(sed -n 's/.* rss: \([0-9]*\)Mb.*/\1/p' "$work/$t.log" | sort -n | tail -1)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  local crashes=$((after - before))
  [ "$rc" != 0 ] && [ "$crashes" = 0 ] && crashes="rc=$rc"
  printf '%s %s %s %s %s %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${rss:-?}" "$crashes" \
    >"$work/$t.row"
}

jobs="${FUZZ_JOBS:-1}"
for t in "${targets[@]}"; do
  run_one "$t" &
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
done
wait

failed=0
printf '\n%-12s %12s %8s %8s %12s %8s\n' target executions cov ft peak-rss-MB crashes
for t in "${targets[@]}"; do
  read -r name execs cov ft rss crashes <"$work/$t.row"
  printf '%-12s %12s %8s %8s %12s %8s\n' "$name" "$execs" "$cov" "$ft" "$rss" "$crashes"
  if [ "$crashes" != 0 ]; then
    failed=1
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$work/$t.log" | head -3 | sed 's/^/    /'
    ls artifacts/"$t" | sed 's/^/    artifact: /' | tail -3
  fi
done
echo "fuzz: ${#targets[@]} targets, ${secs} s each, total $(( $(date +%s) - t0 )) s"
exit "$failed"

#!/usr/bin/env bash
# make fuzz: every fuzz target (fuzz/fuzz_targets, cargo-fuzz on libFuzzer) for
# FUZZ_SECONDS each (default 120), seeded from the small files in fuzz/seeds and the
# project's real fixtures, with libFuzzer's memory limits (a single allocation over
# 1 GB or 2 GB of RSS is a finding) and LeakSanitizer. Results: out/fuzz/fuzz_results.txt;
# each target's log beside it; crashing inputs stay in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SECS=${FUZZ_SECONDS:-120}
# FUZZ_SANITIZER=none builds without AddressSanitizer: the HDF5 targets fork a child per
# input, and forking an ASan process holds them at ~85 executions a second (~275 without);
# their C library runs in that child either way. FUZZ_RUNS stops a target after that
# many executions (libFuzzer's -runs), whichever of it and FUZZ_SECONDS comes first.
SAN=${FUZZ_SANITIZER:-address}
RUNS=${FUZZ_RUNS:--1}
TARGETS=${FUZZ_TARGETS:-"mtx mtx_gz tenx_folder tenx_h5 h5ad safetensors ckpt config_json"}
say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*"; }
rustup toolchain list | grep -q '^nightly' || {
  echo "fuzz: cargo fuzz needs a nightly toolchain (these machines carry one: rustup toolchain list)" >&2; exit 1; }
[ "$(cargo fuzz --version 2>/dev/null | awk '{print $2}')" = 0.13.2 ] || {
  say "installing cargo-fuzz 0.13.2"; cargo install cargo-fuzz --version 0.13.2 --locked; }
# seeds for the HDF5 and weight formats are written by the core's own test helpers
[ -f fuzz/seeds/h5ad/csr.h5ad ] && [ -f fuzz/seeds/safetensors/tiny.safetensors ] || \
  cargo test -p exceiver-core --test data_files -- --ignored write_fuzz_seeds
mkdir -p out/fuzz fuzz/corpus
# the committed corpus: the HDF5 targets' corpora after their 1,000,000-run campaigns,
# minimized (cargo fuzz cmin) and packed (56 files, 4 KB)
tar -C fuzz/corpus -xJf fuzz/corpus-min.tar.xz --skip-old-files
say "building the targets (nightly, sanitizer $SAN, optimised)"
cargo +nightly fuzz build -s "$SAN" -O --fuzz-dir fuzz
: > out/fuzz/summary.tsv
for t in $TARGETS; do
  corpus=fuzz/corpus/$t
  mkdir -p "$corpus"
  seeds=()
  [ -d "fuzz/seeds/$t" ] && seeds+=("fuzz/seeds/$t")
  [ "$t" = ckpt ] && seeds+=(fixtures/checkpoints)
  say "$t for $SECS s"
  set +e
  leaks=()
  [ "$SAN" = address ] && leaks=(-detect_leaks=1)
  cargo +nightly fuzz run -s "$SAN" -O --fuzz-dir fuzz "$t" "$corpus" "${seeds[@]}" -- \
    -max_total_time="$SECS" -runs="$RUNS" -rss_limit_mb=2048 -malloc_limit_mb=1024 "${leaks[@]}" \
    -print_final_stats=1 > "out/fuzz/$t.log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\)/\1/p' "out/fuzz/$t.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\)/\1/p' "out/fuzz/$t.log" | tail -1)
  if [ $rc = 0 ] && [ "$SAN" = address ]; then verdict="no crash, abort or leak"
  elif [ $rc = 0 ]; then verdict="no crash or abort (no leak check without a sanitizer)"; else
    verdict="FINDING (exit $rc): $(grep -m1 -E 'ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)|panicked at' "out/fuzz/$t.log" | cut -c1-160)"; fi
  printf '%s\t%s\t%s\t%s\n' "$t" "${execs:-0}" "${rate:-0}" "$verdict" >> out/fuzz/summary.tsv
done
{
  echo "# exceiver fuzz results"
  echo
  echo "Produced by \`make fuzz\` (scripts/fuzz.sh), $SECS s per target (runs: $RUNS), sanitizer $SAN, libFuzzer with -rss_limit_mb=2048 -malloc_limit_mb=1024$([ "$SAN" = address ] && echo ', LeakSanitizer on')."
  echo
  echo "| target | executions | per second | result |"
  echo "|---|---|---|---|"
  awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' out/fuzz/summary.tsv
} > out/fuzz/fuzz_results.txt
cat out/fuzz/fuzz_results.txt
! grep -q FINDING out/fuzz/summary.tsv

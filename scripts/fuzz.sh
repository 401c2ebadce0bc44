#!/usr/bin/env bash
# Run every fuzz target of fuzz/ for a while each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      (default: 30 seconds, every target)
#
# Environment: FUZZ_SANITIZER (address, the default, or none).
# Needs cargo-fuzz (installed here when missing). Only a stable toolchain is installed, so nightly flags are
# unlocked with RUSTC_BOOTSTRAP=1; if the sanitizer build fails, the targets are built without a sanitizer.
# Corpora grow in fuzz/corpus/TARGET (seeded from the golden fixtures), crashes land in fuzz/artifacts/TARGET;
# both are git-ignored. Exits non-zero when a target finds a crash.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-${FUZZ_SECONDS:-30}}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(chunk_decode keyring_parse manifest_parse wrapped_keyroot)
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

cd fuzz
sanitizer="${FUZZ_SANITIZER:-address}"
if ! cargo fuzz build -s "$sanitizer" >/dev/null 2>fuzz-build.log; then
  if [ "$sanitizer" != none ]; then
    echo "fuzz: building with -s $sanitizer failed (see fuzz/fuzz-build.log); building with -s none" >&2
    sanitizer=none
    cargo fuzz build -s none
  else
    cat fuzz-build.log >&2
    exit 1
  fi
fi
rm -f fuzz-build.log

# Seeds: the golden fixtures, prefixed with the mode byte each target reads first.
data=../crates/isr-format/tests/data
seed() { # TARGET NAME MODE-BYTE-OCTAL FILE
  mkdir -p "corpus/$1"
  { printf "\\$3"; cat "$4"; } >"corpus/$1/seed-$2"
}
seed keyring_parse raw 000 "$data/keyring.bin"
seed keyring_parse fixsum 001 "$data/keyring.bin"
seed manifest_parse raw 000 "$data/manifest.bin"
seed manifest_parse fixmac 001 "$data/manifest.bin"
body_len=$(( $(stat -c %s "$data/manifest.bin") - 76 ))
tail -c +13 "$data/manifest.bin" | head -c "$body_len" >corpus-body.tmp
seed manifest_parse body 002 corpus-body.tmp
rm -f corpus-body.tmp
mkdir -p corpus/wrapped_keyroot
cp "$data/wrapped_password.bin" "$data/wrapped_recovery.bin" corpus/wrapped_keyroot/
mkdir -p corpus/chunk_decode
head -c 4096 ../README.md >corpus/chunk_decode/plain.tmp
{ printf '\003'; cat corpus/chunk_decode/plain.tmp; } >corpus/chunk_decode/seed-plain
if command -v zstd >/dev/null; then
  # Mode 2: a header (ISRC, version 1, AES-256-GCM, zstd, length) and a zstd frame as payload.
  len=$(stat -c %s corpus/chunk_decode/plain.tmp)
  { printf '\002ISRC\001\001\001\000'
    printf "\\$(printf %03o $((len & 255)))\\$(printf %03o $((len >> 8 & 255)))\\000\\000"
    zstd -1 -q -c corpus/chunk_decode/plain.tmp; } >corpus/chunk_decode/seed-zstd
fi
rm -f corpus/chunk_decode/plain.tmp

failed=()
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${secs}s (sanitizer: $sanitizer)" >&2
  mkdir -p "corpus/$t"
  if ! cargo fuzz run -s "$sanitizer" "$t" "corpus/$t" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -max_len=300000 \
      -print_final_stats=1 2>"fuzz-$t.log"; then
    failed+=("$t")
    tail -n 40 "fuzz-$t.log" >&2
  else
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "fuzz-$t.log" | tr '\n' ' ' >&2
    echo >&2
    rm -f "fuzz-$t.log"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${secs}s each, no crash" >&2

#!/usr/bin/env bash
# Smoke run of the fuzz targets (fuzz/README.md): builds them with cargo-fuzz and runs each for
# IPOP_FUZZ_SECONDS seconds (default 20) from its corpus in fuzz/corpus. Fails if any target
# crashes, hangs or does not build.
#
# Needs the nightly toolchain. Without it the run is skipped with a warning, or fails when
# IPOP_FUZZ_REQUIRED=1. cargo-fuzz is installed if it is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
seconds=${IPOP_FUZZ_SECONDS:-20}

if ! cargo +nightly --version >/dev/null 2>&1; then
    message="the nightly toolchain (cargo +nightly) is not available, so the fuzz targets cannot be built"
    if [ "${IPOP_FUZZ_REQUIRED:-0}" = 1 ]; then
        echo "fuzz-smoke: error: $message" >&2
        exit 1
    fi
    echo "fuzz-smoke: WARNING: $message; SKIPPING the fuzz smoke run (set IPOP_FUZZ_REQUIRED=1 to make this an error)" >&2
    exit 0
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

started=$(date +%s)
cd fuzz
cargo +nightly fuzz build
targets=$(cargo +nightly fuzz list)

# New inputs go to a scratch directory: the corpora in the repository stay as committed.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT INT TERM

failed=""
for target in $targets; do
    echo "fuzz-smoke: $target for ${seconds} s"
    mkdir -p "$scratch/$target" "corpus/$target"
    # -timeout: one input that takes more than 10 s is a hang.
    if ! cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
        echo "fuzz-smoke: $target FAILED (the input is in fuzz/artifacts/$target/)" >&2
        failed="$failed $target"
    fi
done

echo "fuzz-smoke: $(echo "$targets" | wc -w) targets in $(($(date +%s) - started)) s"
if [ -n "$failed" ]; then
    echo "fuzz-smoke: failed:$failed" >&2
    exit 1
fi

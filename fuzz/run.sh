#!/usr/bin/env bash
# Builds every fuzz target, replays the known-crash inputs under fuzz/regressions/<target>/,
# then fuzzes each target for SECONDS_PER_TARGET seconds (default 30) starting from the
# committed seeds (fuzz/seeds/<target>, copied into fuzz/corpus/<target>, which keeps growing
# across runs). Prints one line per target with the number of runs executed, and exits
# non-zero if any regression input or any fuzzing run crashed (panic, sanitizer report,
# timeout, out-of-memory), naming the target, the panic message and the input.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET]
#
# Works on the stable toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer, …), which
# RUSTC_BOOTSTRAP=1 allows. Logs and crash inputs land in fuzz/artifacts/ (git-ignored).
# Extra cargo-fuzz build flags can be given in FUZZ_BUILD_FLAGS, e.g. "-s none" to fuzz
# without AddressSanitizer (faster; the code under test is safe Rust).
set -uo pipefail

secs="${1:-30}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac

fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$fuzz_dir/.." || exit 2
export RUSTC_BOOTSTRAP=1
# shellcheck disable=SC2206 # word splitting of the flags is intended
build_flags=(${FUZZ_BUILD_FLAGS:-})

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
if [ "${#targets[@]}" -eq 0 ]; then
    echo "no fuzz targets found" >&2
    exit 2
fi

echo "building ${#targets[@]} fuzz targets…"
if ! cargo fuzz build --fuzz-dir "$fuzz_dir" "${build_flags[@]}"; then
    echo "fuzz build failed" >&2
    exit 2
fi

logs="$fuzz_dir/artifacts/logs"
mkdir -p "$logs"

# The panic message (up to the backtrace) or the libFuzzer / sanitizer summary of a log.
crash_summary() {
    awk '/panicked at/ { p = 1 } /^stack backtrace:|^note: run with/ { p = 0 }
         p || /^SUMMARY:/ { print "    " $0 }' "$1" | head -n 20
}

failed=()

# 1. Known crash inputs: each must now pass. They stay here after the fix, as regression tests.
for target in "${targets[@]}"; do
    [ -d "$fuzz_dir/regressions/$target" ] || continue
    for input in "$fuzz_dir/regressions/$target"/*; do
        [ -f "$input" ] || continue
        log="$logs/$target.regression.$(basename "$input").log"
        if cargo fuzz run --fuzz-dir "$fuzz_dir" "${build_flags[@]}" "$target" "$input" \
            >"$log" 2>&1; then
            printf '%-18s ok     regression %s\n' "$target" "${input#"$fuzz_dir"/}"
        else
            failed+=("$target (regression ${input#"$fuzz_dir"/})")
            printf '%-18s CRASH  regression %s, log %s\n' "$target" "${input#"$fuzz_dir"/}" "$log"
            crash_summary "$log"
        fi
    done
done

# 2. Fuzzing.
for target in "${targets[@]}"; do
    corpus="$fuzz_dir/corpus/$target"
    log="$logs/$target.log"
    mkdir -p "$corpus"
    if [ -d "$fuzz_dir/seeds/$target" ]; then
        cp -n "$fuzz_dir/seeds/$target"/* "$corpus"/ 2>/dev/null || true
    fi

    # Dictionaries of the wire format's tokens (field names, magic, boundary numbers).
    case "$target" in
    decode_messages | verify_directive | tensor_json) dict=json ;;
    topic_parse) dict=topic ;;
    chunk_reply) dict=chunk ;;
    *) dict= ;;
    esac
    dict_flag=()
    if [ -n "$dict" ] && [ -f "$fuzz_dir/dicts/$dict.dict" ]; then
        dict_flag=(-dict="$fuzz_dir/dicts/$dict.dict")
    fi

    cargo fuzz run --fuzz-dir "$fuzz_dir" "${build_flags[@]}" "$target" "$corpus" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        "${dict_flag[@]}" -print_final_stats=1 >"$log" 2>&1
    rc=$?

    runs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)"
    if [ -z "$runs" ]; then
        runs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1 runs/p' "$log" | tail -n 1)"
    fi
    units="$(find "$corpus" -type f | wc -l)"
    if [ "$rc" -eq 0 ]; then
        printf '%-18s ok     %s, corpus %s inputs\n' "$target" "${runs:-? runs}" "$units"
    else
        failed+=("$target")
        printf '%-18s CRASH  %s (exit %s), log %s\n' "$target" "${runs:-? runs}" "$rc" "$log"
        crash_summary "$log"
        crash="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
        if [ -n "$crash" ] && [ -f "$crash" ]; then
            echo "    input: $crash"
            echo "    hex:   $(head -c 512 "$crash" | od -An -v -tx1 | tr -d ' \n')"
            echo "    reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${FUZZ_BUILD_FLAGS:-}${FUZZ_BUILD_FLAGS:+ }$target $crash"
        fi
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found crashes in:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "all ${#targets[@]} targets ran ${secs}s each without a crash"

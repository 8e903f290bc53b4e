#!/usr/bin/env bash
# Mutation fuzzing of every file reader (crates/adapterkit-cli/tests/fuzz.rs) and of the
# composition setup parser, for SECONDS each instead of CI's fixed count.
#   bash scripts/fuzz.sh SECONDS [TARGET-SUBSTRING]
# Failing inputs are kept under target/fuzz-failures/ with their seeds in the output.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:?usage: scripts/fuzz.sh SECONDS [TARGET]}"
export ADAPTERKIT_FUZZ_SECONDS="$seconds"
[ -n "${2:-}" ] && export ADAPTERKIT_FUZZ_TARGET="$2"
cargo test --release -p adapterkit-cli --test fuzz -- --nocapture
cargo test --release -p adapterkit --test composition -- --nocapture mutated_setups

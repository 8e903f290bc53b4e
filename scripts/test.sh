#!/usr/bin/env bash
# The test command: fetch the pinned assets (so the real-model tests run), then formatting,
# lints and every test. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-assets.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Real-model tests must run here, not skip: a missing asset is a failure.
ADAPTERKIT_REQUIRE_ASSETS=1 cargo test --workspace
# The bf16 and int8 fallbacks, on a CPU that has the fast paths too (kernels and the model).
ADAPTERKIT_PORTABLE_KERNELS=1 cargo test -p adapterkit --lib --test precision --test hooks

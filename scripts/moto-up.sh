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
# A free port can be taken by another process before moto binds it (tests
# start servers in parallel): each try uses a fresh port and checks that
# moto itself listens on it.
for try in 1 2 3; do
  port=$(python3 "$here/free-port.py")
  "$PUTONLY_MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$dir/moto.log" 2>&1 &
  echo $! >"$dir/moto.pid"
  if python3 "$here/listening.py" "$(cat "$dir/moto.pid")" "$port" 60; then
    break
  fi
  kill "$(cat "$dir/moto.pid")" 2>/dev/null || true
  echo "moto-up.sh: try $try: moto did not listen on port $port:" >&2
  tail -n 5 "$dir/moto.log" >&2
  [ "$try" = 3 ] && exit 1
done
url="http://127.0.0.1:$port"
"$(dirname "$PUTONLY_MOTO_SERVER")/python" "$here/seed_scenario.py" "$url" "$dir"
echo "MOTO_URL=$url" >"$dir/env"
echo "$url"

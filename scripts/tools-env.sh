# Sourced by the project's scripts: where putonly's test tools live.
# PUTONLY_TOOLS may be set to move them; the default survives between clones
# on one machine, so CI does not rebuild Garage on every run.
: "${PUTONLY_TOOLS:=${XDG_CACHE_HOME:-$HOME/.cache}/putonly-tools}"
export PUTONLY_TOOLS
MOTO_VERSION=5.2.5
GARAGE_VERSION=2.5.0
export PUTONLY_MOTO_SERVER="$PUTONLY_TOOLS/moto-$MOTO_VERSION/bin/moto_server"
export PUTONLY_GARAGE="$PUTONLY_TOOLS/garage-$GARAGE_VERSION/bin/garage"

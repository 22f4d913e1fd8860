#!/usr/bin/env bash
# Starts a single-node Garage on free loopback ports with bucket
# account-b-bucket, a write-only key (profile "garage", for putonly) and a
# read-only key (profile "reader", for checking what arrived). Garage has no
# STS, so there is no role: the write-only key is used as it is.
#
# Usage: scripts/garage-up.sh DIR
# Writes into DIR: garage.toml, garage.pid, garage.log, env (GARAGE_URL,
# WRITER_KEY_ID, WRITER_SECRET, READER_KEY_ID, READER_SECRET), and the AWS
# shared files credentials and config. Needs scripts/install-garage.sh first.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:?usage: garage-up.sh DIR}
. "$here/tools-env.sh"
garage=${PUTONLY_GARAGE_BIN:-$PUTONLY_GARAGE}
[ -x "$garage" ] || { echo "garage-up.sh: no garage at $garage; run scripts/install-garage.sh" >&2; exit 1; }
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
g() { "$garage" -c "$dir/garage.toml" "$@"; }
# Fresh ports on each try: a free port can be taken before garage binds it.
for try in 1 2 3; do
  s3=$(python3 "$here/free-port.py")
  rpc=$(python3 "$here/free-port.py")
  secret=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
  rm -rf "$dir/meta" "$dir/data"
  cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
TOML
  chmod 600 "$dir/garage.toml"
  # Started directly (not through g, which would run in a background
  # subshell): garage.pid must be garage's own pid, or stopping it would
  # leave garage running.
  serve garage "$dir" "$s3 $rpc" "$garage" -c "$dir/garage.toml" server && break
  [ "$try" = 3 ] && exit 1
done
for _ in $(seq 1 300); do
  if g node id -q >/dev/null 2>&1; then break; fi
  sleep 0.1
done
node=$(g node id -q | cut -d@ -f1)
g layout assign -z dc1 -c 1G "$node" >/dev/null
g layout apply --version 1 >/dev/null
g bucket create account-b-bucket >/dev/null
field() { sed -n "s/^ *$1: *//p"; }
w=$(g key create putonly-writer)
r=$(g key create test-reader)
g bucket allow --write account-b-bucket --key putonly-writer >/dev/null
g bucket allow --read account-b-bucket --key test-reader >/dev/null
wid=$(echo "$w" | field "Key ID"); wsec=$(echo "$w" | field "Secret key")
rid=$(echo "$r" | field "Key ID"); rsec=$(echo "$r" | field "Secret key")
cat >"$dir/env" <<ENV
GARAGE_URL=http://127.0.0.1:$s3
WRITER_KEY_ID=$wid
WRITER_SECRET=$wsec
READER_KEY_ID=$rid
READER_SECRET=$rsec
ENV
cat >"$dir/credentials" <<CREDS
[garage]
aws_access_key_id = $wid
aws_secret_access_key = $wsec

[reader]
aws_access_key_id = $rid
aws_secret_access_key = $rsec
CREDS
chmod 600 "$dir/credentials"
printf '[profile garage]\nregion = us-east-1\n\n[profile reader]\nregion = us-east-1\n' >"$dir/config"
echo "http://127.0.0.1:$s3"

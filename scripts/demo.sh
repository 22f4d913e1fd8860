#!/usr/bin/env bash
# The quick start: builds putonly, starts a local moto with the seed's
# cross-account scenario (user bobbytables, role account-a-s3-role allowed to
# PutObject into foo/ and fighters/ only, IAM authorization on), pushes files
# through the role, shows a refused push, and lists what arrived in the
# bucket (read back with a separate admin identity: putonly itself never
# reads). Everything runs on 127.0.0.1 and is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
cleanup() {
  [ -f "$work/moto.pid" ] && kill "$(cat "$work/moto.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== building putonly"
cargo build --release --locked --quiet
putonly=$PWD/target/release/putonly

echo "== starting moto with the seed's scenario (IAM authorization on)"
url=$(scripts/moto-up.sh "$work")
echo "   endpoint $url"
export AWS_SHARED_CREDENTIALS_FILE=$work/credentials AWS_CONFIG_FILE=$work/config
unset AWS_PROFILE AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_ENDPOINT_URL

mkdir -p "$work/outbox/reports"
head -c 1024 /dev/urandom >"$work/outbox/reports/daily.csv"
head -c $((20 * 1024 * 1024)) /dev/urandom >"$work/outbox/reports/big.bin"
: >"$work/outbox/empty.txt"

echo "== configuration ($work/agent.toml)"
sed 's/^/   /' "$work/agent.toml"

echo "== putonly push --config agent.toml --prefix foo/ outbox"
"$putonly" push --config "$work/agent.toml" --prefix foo/ "$work/outbox"

echo "== putonly push --prefix bar/ (outside the allowed prefixes: refused before sending)"
if "$putonly" push --config "$work/agent.toml" --prefix bar/ "$work/outbox/empty.txt"; then
  echo "unexpected: the push to bar/ succeeded" >&2
  exit 1
fi

echo "== what arrived in s3://account-b-bucket (read with the admin identity)"
. scripts/tools-env.sh
"$(dirname "$PUTONLY_MOTO_SERVER")/python" - "$url" "$work" <<'PY'
import hashlib, json, os, sys
import boto3
url, work = sys.argv[1], sys.argv[2]
admin = json.load(open(os.path.join(work, "scenario.json")))["admin"]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id=admin["access_key_id"],
                  aws_secret_access_key=admin["secret_access_key"])
ok = True
for obj in s3.list_objects_v2(Bucket="account-b-bucket").get("Contents", []):
    key = obj["Key"]
    body = s3.get_object(Bucket="account-b-bucket", Key=key)["Body"].read()
    local = os.path.join(work, "outbox", key[len("foo/"):])
    same = open(local, "rb").read() == body
    ok &= same
    print(f"   {key:28} {obj['Size']:>10} bytes  {'identical to' if same else 'DIFFERS from'} {os.path.relpath(local, work)}")
sys.exit(0 if ok else 1)
PY
echo "== done"

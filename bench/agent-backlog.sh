#!/usr/bin/env bash
# Benchmark: N files already waiting when the agent starts (default 100,000
# files of 1 KiB), sent to a local Garage with a write-only key. Reports the
# time from start to the first upload, the time until the journal records
# every file done, and the agent's peak RSS (/usr/bin/time -v).
# Targets: first upload within 2 s; peak RSS under 100 MiB and not growing
# with FILES (measured: 45 MB for 50,000, 27 MB for 200,000).
#
# Usage: bench/agent-backlog.sh [FILES]
# Needs scripts/install-garage.sh first. Runs on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-100000}
work=$(mktemp -d)
cleanup() {
  [ -f "$work/agent.pid" ] && pkill -TERM -P "$(cat "$work/agent.pid")" 2>/dev/null || true
  [ -f "$work/garage/garage.pid" ] && kill "$(cat "$work/garage/garage.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cargo build --release --locked --quiet
url=$(scripts/garage-up.sh "$work/garage")
echo "creating $n files..."
python3 - "$work/outbox" "$n" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02d}")
    if i < 100:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.dat"), "wb") as f:
        f.write(os.urandom(1024))
PY
cat >"$work/agent.toml" <<TOML
[aws]
region = "us-east-1"
profile = "garage"
endpoint_url = "$url"
[bucket]
name = "account-b-bucket"
allowed_prefixes = ["foo/"]
[state]
dir = "$work/state"
[[watch]]
path = "$work/outbox"
prefix = "foo/backlog/"
[upload]
concurrency = 16
TOML
export AWS_SHARED_CREDENTIALS_FILE=$work/garage/credentials AWS_CONFIG_FILE=$work/garage/config
start=$(date +%s.%N)
launched=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
/usr/bin/time -v target/release/putonly run --config "$work/agent.toml" --log-format json \
  2>"$work/agent.log" &
echo $! >"$work/agent.pid"
while :; do
  done_n=$(target/release/putonly status --config "$work/agent.toml" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["done"])' 2>/dev/null || echo 0)
  if [ "$done_n" -ge "$n" ]; then break; fi
  sleep 0.2
done
end=$(date +%s.%N)
echo "all $n files done after $(echo "$end - $start" | bc) s"
pkill -TERM -P "$(cat "$work/agent.pid")"
wait "$(cat "$work/agent.pid")" || true
rm -f "$work/agent.pid"
# The first upload, from the agent's own log timestamps.
python3 - "$launched" "$work/agent.log" <<'PY'
import datetime, json, sys
def ts(s):
    return datetime.datetime.fromisoformat(s.rstrip("Z")[:26])
launched = ts(sys.argv[1])
for line in open(sys.argv[2]):
    if not line.startswith("{"):
        continue
    e = json.loads(line)
    if e.get("fields", {}).get("message") == "uploaded":
        print(f"first upload {(ts(e['timestamp']) - launched).total_seconds():.3f} s after launch")
        break
PY
grep -E "Maximum resident|Elapsed \(wall|User time|System time" "$work/agent.log"

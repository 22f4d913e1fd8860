#!/usr/bin/env bash
# Benchmark: how long after its writer closes a file the agent has it done,
# and how fast it drains a backlog, against a local Garage (write-only key).
#
# 1. Latency. `putonly run` watches a folder with `settle` (default 1s); a
#    writer makes 4 KiB files at 10, 100 and 1,000 files/s and records each
#    file's close time (CLOCK_REALTIME, ns). A file is done when the agent
#    logs "uploaded": that line is written right after the journal committed
#    the file's done (record_done returned), with a microsecond timestamp.
#    The journal's own done_at is in whole seconds, too coarse for this.
#    Latency beyond settle = done - close - settle; p50/p99/max per rate.
# 2. Backlog. N files (default 10,000) of 4 KiB present before the agent
#    starts: files/s from launch until the journal has all of them done,
#    beside a one-shot `putonly push` of the same files on the same Garage
#    (same [upload] settings); the agent goes first in odd rounds, push in
#    even ones (Garage slows as objects pile up).
#
# Several binaries can be compared in one run (each rate, and the backlog,
# alternate between them on the same Garage, in reverse order in even
# rounds: use an even ROUNDS for a fair comparison):
#   PUTONLY_BINS="before=/tmp/putonly-main after=target/release/putonly" bench/agent-latency.sh
# Without PUTONLY_BINS, target/release/putonly is built and measured.
#
# Environment: SETTLE (1s), RATES ("10:200 100:1000 1000:2000", rate:files),
# BACKLOG (10000, 0 to skip), CONCURRENCY (the [upload] concurrency; unset:
# putonly's default), ROUNDS (1: each measurement per binary), KEEP_LOGS
# (a folder to keep each latency run's log and close times in),
# PUTONLY_LOG=putonly=debug (also prints, per rate, where the time goes
# between the agent's debug lines: finished, taken, recorded, sent,
# uploaded; debug logging costs some CPU of its own).
# Needs scripts/install-garage.sh first. Runs on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
settle=${SETTLE:-1s}
rates=${RATES:-"10:200 100:1000 1000:2000"}
backlog=${BACKLOG:-10000}
rounds=${ROUNDS:-1}
if [ -z "${PUTONLY_BINS:-}" ]; then
  cargo build --release --locked --quiet
  PUTONLY_BINS="putonly=target/release/putonly"
fi
work=$(mktemp -d)
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null || true
  [ -f "$work/garage/garage.pid" ] && kill "$(cat "$work/garage/garage.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
url=$(scripts/garage-up.sh "$work/garage")
export AWS_SHARED_CREDENTIALS_FILE=$work/garage/credentials AWS_CONFIG_FILE=$work/garage/config

# config NAME FOLDER PREFIX: an agent configuration with its own state.
config() {
  cat >"$work/$1.toml" <<TOML
[aws]
region = "us-east-1"
profile = "garage"
endpoint_url = "$url"
[bucket]
name = "account-b-bucket"
allowed_prefixes = ["foo/"]
[state]
dir = "$work/$1.state"
[[watch]]
path = "$2"
prefix = "$3"
settle = "$settle"
TOML
  if [ -n "${CONCURRENCY:-}" ]; then
    printf '[upload]\nconcurrency = %s\n' "$CONCURRENCY" >>"$work/$1.toml"
  fi
}

# wait_done NAME N: until the agent logged N files uploaded (each line comes
# after the journal committed that file's done), 10 minutes at most. The log
# is cheaper to look at than `putonly status` on two busy cores, and is read
# once, as it grows (not from its start every 0.1 s: that cost the agent's
# cores a few percent at 10,000 files).
wait_done() {
  python3 - "$work/$1.log" "$2" <<'PY'
import sys, time
path, want = sys.argv[1], int(sys.argv[2])
seen, rest, deadline = 0, b"", time.monotonic() + 600
with open(path, "rb") as log:
    while seen < want:
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting: {seen} of {want} files done")
        chunk = log.read()
        if chunk:
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            seen += sum(b'"message":"uploaded"' in l for l in lines)
            continue
        time.sleep(0.1)
PY
}

# bins_of_round N: the binaries in PUTONLY_BINS order in odd rounds and
# in reverse order in even ones (Garage slows as objects pile up, so none
# always meets the fuller store).
bins_of_round() {
  if [ $(($1 % 2)) = 1 ]; then echo $PUTONLY_BINS; else echo $PUTONLY_BINS | tr ' ' '\n' | tac | tr '\n' ' '; fi
}

# start_agent BIN NAME: runs the agent on $work/NAME.toml until it is ready.
start_agent() {
  PUTONLY_LOG=${PUTONLY_LOG:-putonly=info} "$1" run --config "$work/$2.toml" --log-format json \
    2>"$work/$2.log" &
  agent_pid=$!
  for _ in $(seq 1 300); do
    grep -q '"watching; ready"' "$work/$2.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the agent did not start:" >&2
  tail -n 20 "$work/$2.log" >&2
  return 1
}

stop_agent() {
  kill -TERM "$agent_pid"
  wait "$agent_pid" || true
  agent_pid=
}

# The writer: N files of 4 KiB at RATE files/s into FOLDER, each written
# and closed in place; prints "close_ns path" per file.
cat >"$work/writer.py" <<'PY'
import os, sys, time
folder, rate, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
data = os.urandom(4096)
start = time.monotonic()
out = []
for i in range(n):
    due = start + i / rate
    while True:
        left = due - time.monotonic()
        if left <= 0:
            break
        time.sleep(left if left > 0.002 else 0)
    path = os.path.join(folder, f"f{i:06d}.dat")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.close(fd)
    out.append(f"{time.clock_gettime_ns(time.CLOCK_REALTIME)} {path}")
late = time.monotonic() - start - (n - 1) / rate
print("\n".join(out))
print(f"writer: {n} files at {rate:g}/s, {late * 1000:.0f} ms behind schedule at the end", file=sys.stderr)
PY

# Latency beyond settle per file, from the close times and the log.
cat >"$work/latency.py" <<'PY'
import datetime, json, sys
closes_file, log, settle = sys.argv[1], sys.argv[2], float(sys.argv[3])
closes = {}
for line in open(closes_file):
    ns, path = line.rstrip("\n").split(" ", 1)
    closes[path] = int(ns)
done = {}
# With PUTONLY_LOG=putonly=debug, where the time goes: the agent's debug
# lines for each file, in order.
steps = ["finished", "taken", "recorded; sending", "sent; recording it done", "uploaded"]
seen = {s: {} for s in steps}
for line in open(log):
    if not line.startswith("{"):
        continue
    e = json.loads(line)
    f = e.get("fields", {})
    step = f.get("message")
    if step not in seen or "path" not in f:
        continue
    path = json.loads(f["path"])  # Debug-formatted: a quoted string
    if path in closes and path not in seen[step]:
        t = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
        seen[step][path] = t.timestamp()
done = seen["uploaded"]
lat = sorted((done[p] - closes[p] / 1e9 - settle) * 1000 for p in done)
if not lat:
    print("no file done"); sys.exit()
q = lambda x: lat[min(len(lat) - 1, int(x * len(lat)))]
missing = len(closes) - len(lat)
print(f"p50 {q(0.5):7.1f} ms  p99 {q(0.99):7.1f} ms  max {lat[-1]:7.1f} ms  min {lat[0]:6.1f} ms"
      + (f"  ({missing} not done)" if missing else ""))
prev = ("close + settle", {p: t / 1e9 + settle for p, t in closes.items()})
for step in steps:
    at = seen[step]
    if not at:
        continue
    d = sorted((at[p] - prev[1][p]) * 1000 for p in at if p in prev[1])
    if d:
        qq = lambda x: d[min(len(d) - 1, int(x * len(d)))]
        print(f"    {prev[0]:>24} -> {step:<24} p50 {qq(0.5):7.1f} ms  p99 {qq(0.99):7.1f} ms  max {d[-1]:7.1f} ms")
    prev = (step, at)
PY

settle_s=$(python3 -c "import sys; s=sys.argv[1]; print(float(s[:-2])/1000 if s.endswith('ms') else float(s.rstrip('s')))" "$settle")
echo "Garage at $url; settle = $settle; $(nproc) CPUs; load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "== close-to-done latency beyond settle (4 KiB files) =="
for round in $(seq 1 "$rounds"); do
  for rn in $rates; do
    rate=${rn%%:*}
    n=${rn##*:}
    for entry in $(bins_of_round "$round"); do
      name=${entry%%=*}
      bin=${entry#*=}
      tag=lat-$name-$rate-$round
      mkdir -p "$work/$tag.out"
      config "$tag" "$work/$tag.out" "foo/$tag/"
      start_agent "$bin" "$tag"
      python3 "$work/writer.py" "$work/$tag.out" "$rate" "$n" >"$work/$tag.closes" 2>"$work/$tag.writer"
      wait_done "$tag" "$n"
      stop_agent
      printf '%-10s %5s files/s  %5s files  ' "$name" "$rate" "$n"
      python3 "$work/latency.py" "$work/$tag.closes" "$work/$tag.log" "$settle_s"
      if [ -n "${KEEP_LOGS:-}" ]; then
        mkdir -p "$KEEP_LOGS"
        cp "$work/$tag.log" "$work/$tag.closes" "$KEEP_LOGS/"
      fi
      rm -rf "$work/$tag.out" "$work/$tag.state"
    done
  done
done

[ "$backlog" -gt 0 ] || exit 0
echo
echo "== backlog: $backlog files of 4 KiB waiting at start-up, agent vs one-shot push =="
python3 - "$work/backlog" "$backlog" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
data = os.urandom(4096)
for i in range(n):
    d = os.path.join(root, f"d{i % 100:02d}")
    if i < 100:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:06d}.dat"), "wb") as f:
        f.write(data)
PY
# Old enough that the agent takes them at once (no settle to wait out).
sleep "$settle_s"
for round in $(seq 1 "$rounds"); do
  for entry in $(bins_of_round "$round"); do
    name=${entry%%=*}
    bin=${entry#*=}
    tag=backlog-$name-$round
    config "$tag" "$work/backlog" "foo/$tag/"
    # Garage slows as objects pile up: the agent goes first in odd rounds,
    # push in even ones, so neither always meets the fuller store.
    for which in $([ $((round % 2)) = 1 ] && echo "agent push" || echo "push agent"); do
      start=$(date +%s.%N)
      if [ "$which" = agent ]; then
        start_agent "$bin" "$tag"
        wait_done "$tag" "$backlog"
        agent_s=$(echo "$(date +%s.%N) - $start" | bc)
        stop_agent
      else
        "$bin" push --config "$work/$tag.toml" --prefix "foo/push-$tag/" "$work/backlog" >/dev/null
        push_s=$(echo "$(date +%s.%N) - $start" | bc)
      fi
    done
    python3 - "$name" "$backlog" "$agent_s" "$push_s" <<'PY'
import sys
name, n, a, p = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
print(f"{name:<10} agent {a:6.1f} s = {n / a:6.0f} files/s   push {p:6.1f} s = {n / p:6.0f} files/s   agent/push {p / a:4.2f}")
PY
    rm -rf "$work/$tag.state"
  done
done

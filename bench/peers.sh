#!/usr/bin/env bash
# Benchmark: putonly side by side with its peers (s5cmd, aws cli v1, rclone)
# on the same data, against a local Garage (write-only key) or the
# line-rate sink (bench/sink.rs, which verifies checksums and stores
# nothing, so the client's own speed shows).
#
# Runs alternate (putonly, s5cmd, aws, rclone, putonly, ...); each run
# uploads to a fresh prefix (on Garage, into a fresh Garage: an empty store
# for every run, and the disk stays free). /usr/bin/time measures wall
# time, CPU (user + system) and peak RSS of each tool; the table has the
# median of the runs and putonly's ratio to each peer. A run counts only if
# the tool exited 0 and every object arrived (counted afterwards with the
# read-only key on Garage, from the sink's own counters on the sink). On the
# sink the table also says how many checksums the sink verified, how many
# failed, and how many reads (GET/HEAD/List) the tool sent. putonly runs
# with its defaults (checksums on: CRC64NVME), the peers with theirs; rclone
# with the four flags a write-only bucket needs, s5cmd with its region
# given (without it, s5cmd first asks the bucket for its region: a read).
#
# Usage: bench/peers.sh [--target garage|sink] [--runs N] [--workloads LIST]
#                       [--tools LIST]
#   --target     garage (default) or sink
#   --runs       runs per tool and workload (default 3; the median is shown)
#   --workloads  comma-separated, default 1g,4x1g,1k-4k,10k-4k,1k-1m:
#                [COUNT{x|-}]SIZE, COUNT with an optional k (x1000), SIZE in
#                bytes with k, m or g (KiB, MiB, GiB): 1g is one file of
#                1 GiB, 4x1g four of them in one command, 10k-4k 10,000 files
#                of 4 KiB
#   --tools      comma-separated subset of putonly,s5cmd,aws,rclone (default
#                all four), plus sdk-floor if asked: bench/sdk-floor.rs, the
#                AWS SDK alone sending the workload's PutObjects from memory
#                as putonly configures it (no files read, no journal), the
#                floor under putonly's small-file rate; files of up to 8 MiB
#                only (putonly sends larger ones by multipart)
#   --timeout    seconds one run may take before it is stopped and counted
#                as failed (default 1800)
#   --sink-verify crc (default): the sink checks the CRCs it is sent (all
#                of putonly's), not the MD5 / SHA-1 / SHA-256 digests the
#                peers send: the sink shares the CPUs with the client, and
#                checking those costs it about what computing them costs the
#                client, which made the sink the peers' bottleneck (s5cmd,
#                1 GiB: 11.4 s with them checked, 4.8 s without);
#                all: every checksum, the digests too
# Environment: PUTONLY_BIN (default: builds target/release/putonly),
# PUTONLY_SINK_BIN (default: builds target/release/examples/sink),
# PUTONLY_FLOOR_BIN (default: builds target/release/examples/sdk-floor),
# PUTONLY_GARAGE_BIN (see scripts/garage-up.sh), TMPDIR (data and Garage
# live there: the 4x1g workload needs about 9 GiB free on Garage).
# Exit status: 0 when every run of every tool succeeded, 1 otherwise (the
# table is printed either way), 2 for usage errors.
# Needs scripts/install-garage.sh for --target garage; installs the peers
# itself (scripts/install-peers.sh). Everything runs on 127.0.0.1.
set -euo pipefail
# Paths given relative to the caller's folder stay valid after the cd.
[ -n "${PUTONLY_BIN:-}" ] && PUTONLY_BIN=$(readlink -f "$PUTONLY_BIN")
[ -n "${PUTONLY_SINK_BIN:-}" ] && PUTONLY_SINK_BIN=$(readlink -f "$PUTONLY_SINK_BIN")
[ -n "${PUTONLY_FLOOR_BIN:-}" ] && PUTONLY_FLOOR_BIN=$(readlink -f "$PUTONLY_FLOOR_BIN")
cd "$(dirname "$0")/.."
repo=$(pwd)

target=garage
runs=3
workloads=1g,4x1g,1k-4k,10k-4k,1k-1m
tools=putonly,s5cmd,aws,rclone
sink_verify=crc
run_timeout=1800
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --target) target=${2:?}; shift 2 ;;
    --runs) runs=${2:?}; shift 2 ;;
    --workloads) workloads=${2:?}; shift 2 ;;
    --tools) tools=${2:?}; shift 2 ;;
    --sink-verify) sink_verify=${2:?}; shift 2 ;;
    --timeout) run_timeout=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) echo "peers.sh: unknown argument $1" >&2; usage ;;
  esac
done
case $target in garage | sink) ;; *) echo "peers.sh: --target garage|sink" >&2; exit 2 ;; esac
[[ $runs =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: --runs N" >&2; exit 2; }
[[ $run_timeout =~ ^[1-9][0-9]*$ ]] || { echo "peers.sh: --timeout SECONDS" >&2; exit 2; }
case $sink_verify in all | crc) ;; *) echo "peers.sh: --sink-verify all|crc" >&2; exit 2 ;; esac
IFS=, read -r -a tool_list <<<"$tools"
for t in "${tool_list[@]}"; do
  case $t in putonly | s5cmd | aws | rclone | sdk-floor) ;; *) echo "peers.sh: unknown tool $t" >&2; exit 2 ;; esac
done
IFS=, read -r -a workload_list <<<"$workloads"

# COUNT SIZE_BYTES of a workload name, or exit 2.
parse_workload() {
  python3 - "$1" <<'PY' || { echo "peers.sh: bad workload $1" >&2; exit 2; }
import re, sys
m = re.fullmatch(r"(?:(\d+)(k?)[x-])?(\d+)([kmg]?)", sys.argv[1].lower())
if not m:
    sys.exit(1)
count = int(m.group(1) or 1) * (1000 if m.group(2) else 1)
size = int(m.group(3)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(4)]
if count < 1 or size < 1:
    sys.exit(1)
print(count, size)
PY
}
for w in "${workload_list[@]}"; do parse_workload "$w" >/dev/null; done

. scripts/tools-env.sh
work=$(mktemp -d "${TMPDIR:-/tmp}/putonly-peers.XXXXXX")
sink_pid=
stop_garage() {
  if [ -f "$work/garage/garage.pid" ]; then
    kill "$(cat "$work/garage/garage.pid")" 2>/dev/null || true
    # Wait until it is gone, so that its files can be removed.
    for _ in $(seq 1 100); do
      kill -0 "$(cat "$work/garage/garage.pid")" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$work/garage/garage.pid"
  fi
}
cleanup() {
  stop_garage
  if [ -n "$sink_pid" ]; then kill "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "peers.sh: $*" >&2; }

# The binaries.
if [ -z "${PUTONLY_BIN:-}" ]; then
  log "building putonly (release)"
  cargo build --release --locked --quiet
  PUTONLY_BIN=$repo/target/release/putonly
fi
[ -x "$PUTONLY_BIN" ] || { log "no putonly at $PUTONLY_BIN"; exit 2; }
if [ "$target" = sink ] && [ -z "${PUTONLY_SINK_BIN:-}" ]; then
  log "building the sink (release)"
  cargo build --release --locked --quiet --example sink
  PUTONLY_SINK_BIN=$repo/target/release/examples/sink
fi
peers=0 floor=0
for t in "${tool_list[@]}"; do
  case $t in putonly) ;; sdk-floor) floor=1 ;; *) peers=1 ;; esac
done
if [ $floor = 1 ] && [ -z "${PUTONLY_FLOOR_BIN:-}" ]; then
  log "building sdk-floor (release)"
  cargo build --release --locked --quiet --example sdk-floor
  PUTONLY_FLOOR_BIN=$repo/target/release/examples/sdk-floor
fi
if [ $peers = 1 ] || [ "$target" = garage ]; then
  # The peers, and on Garage s5cmd also counts what arrived.
  scripts/install-peers.sh >&2
fi
peer_bin=$PUTONLY_PEERS/bin

# The tools run with none of the caller's AWS settings.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^AWS_' || true)
export AWS_EC2_METADATA_DISABLED=true AWS_REGION=us-east-1
bucket=account-b-bucket

# The target's endpoint, with profile "garage" (write-only on Garage, any
# key on the sink) in $creds/credentials and $creds/config.
start_garage() {
  stop_garage
  rm -rf "$work/garage"
  url=$(scripts/garage-up.sh "$work/garage")
  creds=$work/garage
  # shellcheck disable=SC1091
  . "$work/garage/env"
  key_id=$WRITER_KEY_ID key_secret=$WRITER_SECRET
}
start_sink() {
  mkdir -p "$work/sink"
  "$PUTONLY_SINK_BIN" --verify "$sink_verify" >"$work/sink/out" 2>"$work/sink/log" &
  sink_pid=$!
  for _ in $(seq 1 100); do
    url=$(head -n 1 "$work/sink/out" 2>/dev/null || true)
    [ -n "$url" ] && break
    sleep 0.05
  done
  [ -n "$url" ] || { log "the sink did not start:"; cat "$work/sink/log" >&2; exit 1; }
  creds=$work/sink
  key_id=AKIDPUTONLYBENCHSINK key_secret=sink-checks-no-signature
  printf '[garage]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$key_id" "$key_secret" >"$creds/credentials"
  chmod 600 "$creds/credentials"
  printf '[profile garage]\nregion = us-east-1\n' >"$creds/config"
}
sink_stats() { curl -sf "$url/__sink/stats?reset=1"; }
# The server's CPU time so far (user + system, all its threads), in clock
# ticks: read before and after each run, so the table shows what each
# tool's requests cost the server on the same two cores.
clk_tck=$(getconf CLK_TCK)
server_ticks() {
  local pid
  if [ "$target" = garage ]; then pid=$(cat "$work/garage/garage.pid"); else pid=$sink_pid; fi
  # Fields after the command name, which ends with ") ": utime, stime are
  # 12th and 13th. Nothing when the server is gone.
  [ -r "/proc/$pid/stat" ] || return 0
  sed 's/.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}'
}
write_rclone_conf() {
  cat >"$work/rclone.conf" <<CONF
[target]
type = s3
provider = Other
access_key_id = $key_id
secret_access_key = $key_secret
endpoint = $url
region = us-east-1
force_path_style = true
CONF
}

# cmd=(one tool's command line uploading folder $2's files to prefix $3).
tool_cmd() {
  local tool=$1 dir=$2 prefix=$3
  case $tool in
    putonly) cmd=("$PUTONLY_BIN" push --bucket "$bucket" --profile garage --region us-east-1
      --endpoint-url "$url" --prefix "$prefix" --no-progress "$dir/") ;;
    s5cmd) cmd=("$peer_bin/s5cmd" --endpoint-url "$url" --profile garage
      --credentials-file "$creds/credentials" cp "$dir/*" "s3://$bucket/$prefix") ;;
    aws) cmd=("$peer_bin/aws" --profile garage --endpoint-url "$url" s3 cp --recursive
      --only-show-errors "$dir" "s3://$bucket/$prefix") ;;
    rclone) cmd=("$peer_bin/rclone" --config "$work/rclone.conf" copy --s3-no-check-bucket
      --s3-no-head --no-check-dest --multi-thread-streams 0 "$dir" "target:$bucket/$prefix") ;;
    # As many at once as putonly sends: up to 64 requests, and files over
    # 64 KiB within its default part memory (64 MiB).
    sdk-floor) cmd=(env AWS_PROFILE=garage "$PUTONLY_FLOOR_BIN" --endpoint-url "$url" --bucket "$bucket"
      --prefix "$prefix" --count "$count" --size "$size"
      --in-flight $((size <= 65536 ? 64 : ((64 << 20) / size < 64 ? (64 << 20) / size : 64)))) ;;
  esac
}

# Objects under a prefix, read with the read-only key (Garage only).
count_objects() {
  AWS_SHARED_CREDENTIALS_FILE=$creds/credentials AWS_CONFIG_FILE=$creds/config \
    "$peer_bin/s5cmd" --endpoint-url "$url" --profile reader --credentials-file "$creds/credentials" \
    ls "s3://$bucket/$1*" 2>/dev/null | grep -vc '^ *DIR ' || true
}

# The header: the machine and the versions.
versions() {
  echo "- machine: Linux $(uname -r), $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM"
  echo "- putonly: $("$PUTONLY_BIN" --version) ($(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown), $PUTONLY_BIN)"
  for t in "${tool_list[@]}"; do
    case $t in
      s5cmd) echo "- s5cmd: $("$peer_bin/s5cmd" version)" ;;
      aws) echo "- aws cli: $("$peer_bin/aws" --version 2>&1)" ;;
      rclone) echo "- rclone: $("$peer_bin/rclone" version | head -n 1)" ;;
      sdk-floor) echo "- sdk-floor: bench/sdk-floor.rs ($(sed -n 's/^aws-sdk-s3 = "\(.*\)"$/aws-sdk-s3 \1/p' "$repo/Cargo.toml"), $PUTONLY_FLOOR_BIN), PutObjects from memory" ;;
    esac
  done
  if [ "$target" = garage ]; then
    echo "- target: Garage $GARAGE_VERSION, single node on 127.0.0.1 (write-only key), a fresh one for each run"
  else
    local what="verifies every checksum it is sent"
    [ "$sink_verify" = crc ] && what="verifies the CRCs it is sent, skips MD5 / SHA-1 / SHA-256 (--sink-verify crc)"
    echo "- target: the sink (bench/sink.rs, $PUTONLY_SINK_BIN) on 127.0.0.1: no signature checks, $what, stores nothing"
  fi
}

results=$work/results.tsv
: >"$results"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
[ "$target" = sink ] && start_sink
for w in "${workload_list[@]}"; do
  read -r count size < <(parse_workload "$w")
  data=$work/data/$w
  log "workload $w: creating $count file(s) of $size bytes"
  python3 - "$data" "$count" "$size" <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(root)
width = len(str(n - 1))
for i in range(n):
    with open(os.path.join(root, f"f{i:0{width}d}.bin"), "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 << 20))
            f.write(chunk)
            left -= len(chunk)
PY
  # Into the page cache, so that no tool pays for the first read.
  cat "$data"/* >/dev/null
  for r in $(seq 1 "$runs"); do
    for t in "${tool_list[@]}"; do
      # The floor sends single PutObjects: it stands for putonly's path
      # only below the multipart threshold.
      [ "$t" = sdk-floor ] && [ "$size" -gt $((8 << 20)) ] && continue
      prefix=bench/$stamp/$w/$t-r$r/
      if [ "$target" = garage ]; then start_garage; else sink_stats >/dev/null; fi
      write_rclone_conf
      tool_cmd "$t" "$data" "$prefix"
      out=$work/run.log
      server_before=$(server_ticks)
      set +e
      AWS_SHARED_CREDENTIALS_FILE=$creds/credentials AWS_CONFIG_FILE=$creds/config \
        /usr/bin/time -f '%e %U %S %M' -o "$work/time" \
        timeout -k 10 "$run_timeout" "${cmd[@]}" >"$out" 2>&1
      rc=$?
      set -e
      server_after=$(server_ticks)
      server=-
      if [ -n "$server_before" ] && [ -n "$server_after" ]; then
        server=$(echo "scale=2; ($server_after - $server_before) / $clk_tck" | bc)
      fi
      read -r wall user sys rss < <(tail -n 1 "$work/time")
      verified=- failed=- reads=- skipped=-
      if [ "$target" = garage ]; then
        objects=$(count_objects "$prefix")
        stop_garage
        rm -rf "$work/garage"
      else
        stats=$(sink_stats)
        read -r objects verified failed reads skipped < <(python3 -c '
import json, sys
s = json.loads(sys.argv[1])
print(s["objects"], s["checksums_verified"], s["checksum_failures"], s["reads"] + s["other_refused"], s["digests_skipped"])' "$stats")
      fi
      ok=1 why=
      case $rc in
        0) ;;
        124 | 137) ok=0 why="stopped after --timeout $run_timeout s" ;;
        *) ok=0 why="exit status $rc" ;;
      esac
      [ "$objects" = "$count" ] || { ok=0; why="${why:+$why, }$objects of $count objects arrived"; }
      if [ "$failed" != - ] && [ "$failed" != 0 ]; then ok=0; why="${why:+$why, }$failed checksum failures"; fi
      if [ "$t" = putonly ] && [ "$reads" != - ] && [ "$reads" != 0 ]; then ok=0; why="${why:+$why, }$reads reads"; fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$t" "$r" "$ok" "$wall" "$user" "$sys" "$rss" \
        "$objects" "$count" "$verified" "$failed" "$reads" "$skipped" "$server" >>"$results"
      if [ $ok = 1 ]; then
        log "$w $t run $r: ${wall}s wall, $user+$sys s CPU, ${rss} KB peak RSS, server ${server}s CPU"
      else
        log "$w $t run $r FAILED: $why; its output ends with:"
        tail -n 5 "$out" | sed 's/^/    /' >&2
      fi
      if [ "$target" = sink ] && [ "$reads" != 0 ]; then
        log "$w $t run $r: the sink refused $reads read(s); the last ones:"
        grep '^refused' "$work/sink/log" | tail -n 3 | sed 's/^/    /' >&2
      fi
    done
  done
  rm -rf "$data"
done

echo "## bench/peers.sh --target $target --runs $runs --workloads $workloads --tools $tools"
echo
echo "$(date -u +%Y-%m-%dT%H:%MZ)"
echo
versions
echo
python3 - "$results" "$target" "$runs" <<'PY'
import statistics, sys
path, target, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
order, runs_of = [], {}
for w, t, r, ok, wall, user, sys_, rss, objects, count, verified, failed, reads, skipped, server in rows:
    if (w, t) not in runs_of:
        order.append((w, t))
        runs_of[(w, t)] = []
    runs_of[(w, t)].append(dict(ok=ok == "1", wall=float(wall), cpu=float(user) + float(sys_),
                                server=None if server == "-" else float(server),
                                rss=int(rss) / 1024, count=int(count), verified=verified,
                                failed=failed, reads=reads, skipped=skipped))
def size_of(w):
    import re
    m = re.fullmatch(r"(?:(\d+)(k?)[x-])?(\d+)([kmg]?)", w.lower())
    return int(m.group(3)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(4)]
med = {}
for key, rs in runs_of.items():
    good = [r for r in rs if r["ok"]]
    if good:
        med[key] = {k: statistics.median(r[k] for r in good) for k in ("wall", "cpu", "rss")}
        servers = [r["server"] for r in good if r["server"] is not None]
        med[key]["server"] = statistics.median(servers) if servers else None
def rate(w, m, count):
    size = size_of(w)
    if size >= 1 << 20:
        return count * size / m["wall"] / 1e6, "MB/s"
    return count / m["wall"], "files/s"
head = "| workload | tool | runs ok | wall s | CPU s (user+sys) | server CPU s | peak RSS MB | rate | putonly wall ÷ tool | putonly CPU ÷ tool | putonly rate ÷ tool |"
if target == "sink":
    head += " checksums verified / failed | reads sent |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
for w, t in order:
    rs = runs_of[(w, t)]
    nok = sum(r["ok"] for r in rs)
    m = med.get((w, t))
    count = rs[0]["count"]
    cells = [w, t, f"{nok}/{len(rs)}"]
    if m:
        r_val, unit = rate(w, m, count)
        cells += [f"{m['wall']:.2f}", f"{m['cpu']:.2f}", f"{m['server']:.2f}" if m["server"] is not None else "-", f"{m['rss']:.0f}", f"{r_val:,.0f} {unit}" if r_val >= 100 else f"{r_val:.1f} {unit}"]
        p = med.get((w, "putonly"))
        if p and t != "putonly":
            pr, _ = rate(w, p, count)
            cells += [f"{p['wall'] / m['wall']:.2f}", f"{p['cpu'] / m['cpu']:.2f}" if m["cpu"] > 0 else "-", f"{pr / r_val:.2f}"]
        else:
            cells += ["-", "-", "-"]
    else:
        cells += ["FAILED"] + ["-"] * 7
    if target == "sink":
        ver = "/".join(str(sum(int(r[k]) for r in rs)) for k in ("verified", "failed"))
        skipped = sum(int(r["skipped"]) for r in rs)
        if skipped:
            ver += f" ({skipped} digests skipped)"
        cells += [ver, str(sum(int(r["reads"]) for r in rs))]
    print("| " + " | ".join(cells) + " |")
print()
print(f"Medians of the successful runs ({runs} per tool and workload, alternating). "
      "CPU is the client's user + system time, server CPU the server's (all its "
      "threads) from the tool's start to its exit (work the server defers past "
      "that is not counted); ratios below 1 in the wall and CPU "
      "columns and above 1 in the rate column favour putonly.")
if target == "sink":
    print("The sink's counts are totals over all runs of a row: checksums it verified "
          "(headers, aws-chunked trailers, CompleteMultipartUpload's part and full-object "
          "checksums) and failed, and the reads (GET/HEAD/List and other non-write calls) "
          "it refused with 403.")
failed = [f"{w} {t}" for (w, t), rs in runs_of.items() if not all(r["ok"] for r in rs)]
if failed:
    print()
    print("**Failed runs**: " + ", ".join(failed) + " (see the log above the table).")
    sys.exit(1)
PY

#!/usr/bin/env bash
# Benchmark: the instructions one `putonly push` of COUNT files of SIZE bytes
# to the line-rate sink (bench/sink.rs) takes, counted by
# `valgrind --tool=callgrind`: steady where seconds are not (the same build,
# inputs and environment give the same count to within 0.1%, whatever else
# the machine does), so two builds compare on a busy machine. Each binary
# named runs ROUNDS times, alternating; the table has each run's total.
#
# Usage: bench/callgrind-push.sh [--count N] [--size BYTES] [--rounds N] BINARY...
#   --count   files (default 1000)
#   --size    bytes each (default 4096)
#   --rounds  runs of each binary (default 2)
# Environment: PUTONLY_SINK_BIN (default: builds target/release/examples/sink).
# Needs valgrind (Debian's package). Under callgrind openat2 answers ENOSYS,
# so putonly opens files by its one-folder-at-a-time fallback, alike for
# every binary. Exit status: 0, or 1 when a push failed, 2 for usage errors.
set -euo pipefail
count=1000 size=4096 rounds=2
bins=()
while [ $# -gt 0 ]; do
  case $1 in
    --count) count=${2:?}; shift 2 ;;
    --size) size=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
    *) bins+=("$(readlink -f "$1")"); shift ;;
  esac
done
[ ${#bins[@]} -gt 0 ] || { echo "callgrind-push.sh: name at least one putonly binary" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "callgrind-push.sh: valgrind is not installed" >&2; exit 2; }
[ -n "${PUTONLY_SINK_BIN:-}" ] && PUTONLY_SINK_BIN=$(readlink -f "$PUTONLY_SINK_BIN")
cd "$(dirname "$0")/.."
if [ -z "${PUTONLY_SINK_BIN:-}" ]; then
  cargo build --release --locked --quiet --example sink
  PUTONLY_SINK_BIN=$PWD/target/release/examples/sink
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/putonly-callgrind.XXXXXX")
sink_pid=
cleanup() {
  [ -n "$sink_pid" ] && kill "$sink_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
"$PUTONLY_SINK_BIN" --verify crc >"$work/sink.out" 2>"$work/sink.log" &
sink_pid=$!
url=
for _ in $(seq 1 100); do
  url=$(head -n 1 "$work/sink.out" 2>/dev/null || true)
  [ -n "$url" ] && break
  sleep 0.05
done
[ -n "$url" ] || { echo "callgrind-push.sh: the sink did not start" >&2; cat "$work/sink.log" >&2; exit 1; }
printf '[bench]\naws_access_key_id = AKIDPUTONLYBENCHSINK\naws_secret_access_key = sink\n' >"$work/credentials"
printf '[profile bench]\nregion = us-east-1\n' >"$work/config"
mkdir "$work/files"
python3 - "$work/files" "$count" "$size" <<'PY'
import os, sys
folder, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(count):
    with open(os.path.join(folder, "f%06d" % i), "wb") as f:
        f.write(os.urandom(size))
PY
while read -r v; do unset "$v"; done < <(compgen -e | grep '^AWS_' || true)
export AWS_SHARED_CREDENTIALS_FILE=$work/credentials AWS_CONFIG_FILE=$work/config AWS_EC2_METADATA_DISABLED=true
echo "| binary | round | instructions |"
echo "|---|---|---|"
status=0
for round in $(seq 1 "$rounds"); do
  for b in "${bins[@]}"; do
    out=$work/callgrind.out
    if ! valgrind --tool=callgrind --callgrind-out-file="$out" "$b" push --bucket account-b-bucket \
      --profile bench --region us-east-1 --endpoint-url "$url" --prefix "foo/r$round/" \
      --no-progress "$work/files/" >"$work/push.log" 2>&1; then
      echo "callgrind-push.sh: $b failed:" >&2
      tail -n 5 "$work/push.log" >&2
      status=1
      continue
    fi
    total=$(sed -n 's/^summary: //p' "$out")
    printf '| %s | %s | %s |\n' "$b" "$round" "$total"
  done
done
exit $status

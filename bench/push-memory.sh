#!/usr/bin/env bash
# Benchmark: one large file pushed to a local Garage (write-only key,
# checksums on), measured with /usr/bin/time -v: wall time, CPU time and
# peak RSS. The target: peak RSS well under 100 MiB for a 1 GiB file with
# the default settings (8 MiB parts x 8 in flight).
#
# Usage: bench/push-memory.sh [SIZE_MIB]   (default 1024)
# Needs scripts/install-garage.sh first. Runs on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
work=$(mktemp -d)
trap '[ -f "$work/garage.pid" ] && kill "$(cat "$work/garage.pid")"; rm -rf "$work"' EXIT
cargo build --release --locked --quiet
url=$(scripts/garage-up.sh "$work/garage")
head -c $((size_mib * 1024 * 1024)) /dev/urandom >"$work/big.bin"
export AWS_SHARED_CREDENTIALS_FILE=$work/garage/credentials AWS_CONFIG_FILE=$work/garage/config
/usr/bin/time -v target/release/putonly push --bucket account-b-bucket --profile garage \
  --region us-east-1 --endpoint-url "$url" --prefix foo/bench/ --no-progress "$work/big.bin" \
  2>"$work/time.txt"
grep -E "Elapsed \(wall|User time|System time|Maximum resident" "$work/time.txt"

#!/usr/bin/env bash
# The whole ISR story on the embedded default, in one run:
#   server in a temp dir -> user -> parcel from the test guest -> resume headless on client A -> the guest
#   counts -> suspend -> check in -> client B checks out and resumes -> the guest keeps counting where it
#   stopped -> suspend, check in -> the disk holds every counter the guest wrote, as one contiguous run.
# Prints each step's time and the bytes moved.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${ISR_BIN:-$root/target/release}"
guest="$root/guest/out"
work="$(mktemp -d /tmp/isr-demo.XXXXXX)"
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    pkill -f "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

export ISR_PASSWORD="demo password" ISR_USER=demo ISR_ACCEL="${ISR_ACCEL:-tcg}"
t_start=$(date +%s.%N)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; t0=$(date +%s.%N); }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
took() { echo "   ($(elapsed "$t0") s)"; }
counters() { grep -ao 'isr-counter [0-9]*' "$1" 2>/dev/null | awk '{print $2}' || true; }
wait_counters() { # FILE N
    for _ in $(seq 1 600); do
        [ "$(counters "$1" | wc -l)" -ge "$2" ] && return 0
        sleep 0.2
    done
    echo "the guest did not count to $2 in time; console:" >&2; tail -20 "$1" >&2; exit 1
}

step "start isr-server (embedded default: SQLite + chunk files in $work/data)"
"$bin/isr-server" user add demo --data "$work/data" >/dev/null
"$bin/isr-server" serve --data "$work/data" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 1 100); do grep -q listening "$work/server.out" && break; sleep 0.1; done
export ISR_SERVER="$(sed -n 's/^listening on //p' "$work/server.out")"
echo "   $ISR_SERVER"; took

step "create parcel 'desktop' from the test guest (64 MiB disk, kernel, initrd, 256 MiB RAM)"
cp "$guest/disk.img" "$work/disk.img"
ISR_HOME="$work/a" "$bin/isr" create desktop --disk "$work/disk.img" --memory 256 \
    --kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" \
    --append "console=ttyS0 quiet panic=-1 init_on_free=1" -m "installed"
took

step "client A: resume headless (checks out, boots; the guest appends a counter to its disk every second)"
ISR_HOME="$work/a" "$bin/isr" resume desktop --display none >"$work/a-resume.out" 2>&1 &
resume_pid=$!
con_a="$work/a/logs/demo/desktop/console.log"
wait_counters "$con_a" 5
echo "   guest on A printed: $(counters "$con_a" | tr '\n' ' ')"; took

step "client A: suspend (memory saved through QEMU migration, chunked and encrypted like the disk)"
ISR_HOME="$work/a" "$bin/isr" suspend desktop
wait "$resume_pid"
sed 's/^/   /' "$work/a-resume.out" | grep -v console
last_a=$(counters "$con_a" | tail -1)
ISR_HOME="$work/a" "$bin/isr" stat desktop | sed 's/^/   /'; took

step "client A: check in (uploads only chunks the server lacks, releases the lock)"
ISR_HOME="$work/a" "$bin/isr" checkin desktop -m "suspended on A" | sed 's/^/   /'; took

step "client B (another home = another machine): resume; the guest continues from memory"
ISR_HOME="$work/b" "$bin/isr" resume desktop --display none >"$work/b-resume.out" 2>&1 &
resume_pid=$!
con_b="$work/b/logs/demo/desktop/console.log"
wait_counters "$con_b" 4
first_b=$(counters "$con_b" | head -1)
echo "   last counter on A: $last_a; first counter on B: $first_b"
if [ "$first_b" != "$((last_a + 1))" ]; then echo "   the guest did not continue where it stopped" >&2; exit 1; fi
echo "   the guest kept counting where it was suspended"; took

step "client B: suspend and check in"
ISR_HOME="$work/b" "$bin/isr" suspend desktop
wait "$resume_pid"
sed 's/^/   /' "$work/b-resume.out" | grep -v console
last_b=$(counters "$con_b" | tail -1)
ISR_HOME="$work/b" "$bin/isr" checkin desktop -m "suspended on B" | sed 's/^/   /'; took

step "the disk of the head version holds every counter, as one contiguous run"
ISR_HOME="$work/b" "$bin/isr" export desktop --output "$work/final.img" | sed 's/^/   /'
e2fsck -fy "$work/final.img" >/dev/null 2>&1 || true
debugfs -R 'cat /counter' "$work/final.img" 2>/dev/null | grep -E '^[0-9]+$' >"$work/counter.txt"
n=$(wc -l <"$work/counter.txt")
if [ "$(seq 1 "$n" | diff - "$work/counter.txt" | wc -l)" != 0 ] || [ "$(tail -1 "$work/counter.txt")" -lt "$last_b" ]; then
    echo "   counter file is not contiguous up to $last_b" >&2; exit 1
fi
echo "   /counter: 1..$n, contiguous (guest printed up to $last_b)"; took

step "versions on the server (bytes uploaded per check-in)"
ISR_HOME="$work/b" "$bin/isr" versions desktop | sed 's/^/   /'
echo
echo "demo finished in $(elapsed "$t_start") s: the parcel moved from client A to client B mid-run."


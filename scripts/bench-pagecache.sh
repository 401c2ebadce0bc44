#!/usr/bin/env bash
# What the guest agent's page-cache drop saves at check-in, measured on a real Debian 12 guest (systemd,
# qemu-guest-agent) under TCG: resume, write 100 MiB of new files in the guest (through the agent's guest-exec),
# suspend, check in; once with the drop before the suspend (the default) and once without it
# (ISR_GUEST_PAGE_CACHE=keep), each from the same checked-in starting version. Prints the bytes each check-in
# sent. Builds the guest with mmdebstrap into $ISR_BENCH_DIR (default /tmp/isr-bench-debian, kept for re-runs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${ISR_BIN:-$root/target/release}"
guest="${ISR_BENCH_DIR:-/tmp/isr-bench-debian}"
mkdir -p "$guest"
command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap
if [ ! -s "$guest/disk.img" ]; then
    rm -rf "$guest/root"
    mmdebstrap --variant=minbase --include=systemd-sysv,udev,kmod,linux-image-cloud-amd64,initramfs-tools,qemu-guest-agent \
        --customize-hook='echo virtio_pci >> "$1/etc/initramfs-tools/modules"; echo virtio_blk >> "$1/etc/initramfs-tools/modules"; echo virtio_console >> "$1/etc/initramfs-tools/modules"' \
        --customize-hook='chroot "$1" update-initramfs -u -k all' \
        --customize-hook='echo "/dev/vda / ext4 defaults 0 1" > "$1/etc/fstab"' \
        bookworm "$guest/root" >&2
    cp "$guest"/root/boot/vmlinuz-* "$guest/vmlinuz"
    cp "$guest"/root/boot/initrd.img-* "$guest/initrd.img"
    truncate -s 1G "$guest/disk.img.tmp"
    mkfs.ext4 -q -F -d "$guest/root" "$guest/disk.img.tmp"
    mv "$guest/disk.img.tmp" "$guest/disk.img"
    rm -rf "$guest/root"
fi

work="$(mktemp -d /tmp/isr-bench-pc.XXXXXX)"
cleanup() { [ -n "${server_pid:-}" ] && kill "$server_pid" 2>/dev/null; pkill -f "$work" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export ISR_PASSWORD=bench ISR_USER=bench ISR_ACCEL="${ISR_ACCEL:-tcg}" ISR_HOME="$work/home" ISR_RUNTIME_DIR="$work/run"
mkdir -p "$work/run"
"$bin/isr-server" user add bench --data "$work/data" >/dev/null
"$bin/isr-server" serve --data "$work/data" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
for _ in $(seq 1 100); do grep -q listening "$work/server.out" && break; sleep 0.1; done
export ISR_SERVER="$(sed -n 's/^listening on //p' "$work/server.out")"
cp "$guest/disk.img" "$work/disk.img"
"$bin/isr" create deb --disk "$work/disk.img" --memory 512 --kernel "$guest/vmlinuz" --initrd "$guest/initrd.img" \
    --append "root=/dev/vda rw console=ttyS0 quiet ${ISR_BENCH_APPEND:-init_on_free=1}" >/dev/null

agent() { # JSON command -> answer, through the running VM's agent socket
    python3 - "$(ls -d "$work"/run/isr-deb-*)/qga.sock" "$1" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(600); f = s.makefile("rw")
f.write(json.dumps({"execute": "guest-sync", "arguments": {"id": 99}}) + "\n"); f.flush()
while "99" not in f.readline(): pass
f.write(sys.argv[2] + "\n"); f.flush(); print(f.readline().strip())
PY
}
guest_sh() { # run a shell command in the guest and wait for it
    pid=$(agent "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"$1\"]}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["return"]["pid"])')
    until agent "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}" | grep -q '"exited": *true'; do sleep 1; done
}
session() { # LABEL [env...]: resume, wait for the agent, write 100 MiB of files, suspend, check in; print bytes sent
    local label=$1; shift
    env "$@" "$bin/isr" resume deb --display none >"$work/$label.resume" 2>&1 &
    local rpid=$!
    for _ in $(seq 1 900); do grep -q "guest clock set" "$work/$label.resume" && break; sleep 1; done
    grep -q "guest clock set" "$work/$label.resume" || { echo "no guest agent in time" >&2; tail "$work/$label.resume" >&2; exit 1; }
    guest_sh "mkdir -p /root/data && dd if=/dev/urandom of=/root/data/$label bs=1M count=100 status=none && sync"
    env "$@" "$bin/isr" suspend deb >/dev/null
    wait "$rpid"
    local out; out=$("$bin/isr" checkin deb -m "$label")
    echo "$label: $out"
}
# A first session boots the guest and leaves it suspended, so both measured sessions start from memory.
session warmup >/dev/null
session drop
session keep ISR_GUEST_PAGE_CACHE=keep

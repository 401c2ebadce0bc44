#!/usr/bin/env bash
# Builds the isr test guest from Debian packages only (run as root on Debian bookworm).
#
#   guest/out/vmlinuz     Debian cloud kernel (unpacked from its .deb, not installed)
#   guest/out/initrd.img  busybox-static initramfs whose /init runs a persistent counter
#   guest/out/disk.img    64 MiB raw ext4 disk (created only when absent)
#
# Idempotent: every step is skipped when its result already exists, so re-runs take well under a second.
# Environment: ISR_GUEST_OUT overrides the output directory; ISR_GUEST_REBUILD=1 rebuilds the initrd.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${ISR_GUEST_OUT:-$here/out}"
mkdir -p "$out"

# Serialise concurrent runs (several test binaries may call this script at once).
exec 9>"$out/.lock"
flock 9

log() { echo "guest/build.sh: $*" >&2; }

apt_updated=0
apt_update() {
    if [ "$apt_updated" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        apt_updated=1
    fi
}

as_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root to install packages: $*"
        exit 1
    fi
}

# --- QEMU >= 10 (from bookworm-backports: bookworm's own 7.2 has no file: migration URI) ---
qemu_major() {
    qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1
}
major="$(qemu_major || true)"
if [ -z "$major" ] || [ "$major" -lt 10 ]; then
    as_root "qemu-system-x86"
    src=/etc/apt/sources.list.d/bookworm-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        main=/etc/apt/sources.list.d/debian.sources
        uri="$(sed -n 's/^URIs: *//p' "$main" 2>/dev/null | grep -v security | head -n1)"
        key="$(sed -n 's/^Signed-By: *//p' "$main" 2>/dev/null | head -n1)"
        : "${uri:=http://deb.debian.org/debian}"
        : "${key:=/usr/share/keyrings/debian-archive-keyring.gpg}"
        log "adding $src ($uri)"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
            "$uri" "$key" >"$src"
    fi
    apt_update
    log "installing qemu-system-x86 and qemu-utils from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-utils >&2
    major="$(qemu_major)"
    if [ -z "$major" ] || [ "$major" -lt 10 ]; then
        log "qemu-system-x86_64 is still not version >= 10"
        exit 1
    fi
fi

# --- small tools ---
need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v mkfs.ext4 >/dev/null 2>&1 && command -v debugfs >/dev/null 2>&1 || need+=(e2fsprogs)
command -v gzip >/dev/null 2>&1 || need+=(gzip)
command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
command -v flock >/dev/null 2>&1 || need+=(util-linux)
if [ "${#need[@]}" -gt 0 ]; then
    as_root "${need[*]}"
    apt_update
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
busybox_bin=/bin/busybox # from busybox-static (which conflicts with the dynamic busybox package)

# --- kernel: the package linux-image-cloud-amd64 depends on, unpacked (never installed) ---
# Only vmlinuz and the virtio modules are kept (out/modules); the unpacked package (~100 MB) is removed.
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
    failover net_failover virtio_net virtio_console)
have_kernel=1
[ -s "$out/vmlinuz" ] || have_kernel=0
for m in "${modules[@]}"; do [ -s "$out/modules/$m.ko" ] || have_kernel=0; done
if [ "$have_kernel" = 0 ]; then
    resolve() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -n1; }
    pkg="$(resolve)"
    if [ -z "$pkg" ]; then
        apt_update
        pkg="$(resolve)"
    fi
    [ -n "$pkg" ] || { log "cannot resolve the kernel package of linux-image-cloud-amd64"; exit 1; }
    tmp="$out/kernel.tmp"
    rm -rf "$tmp" "$out/modules"
    mkdir -p "$tmp/dl" "$out/modules"
    log "downloading $pkg"
    download() { (cd "$tmp/dl" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" >&2); }
    download || { apt_update; download; }
    dpkg-deb -x "$tmp"/dl/"$pkg"_*.deb "$tmp/root"
    moddir="$(ls -d "$tmp"/root/lib/modules/*/kernel | head -n1)"
    for m in "${modules[@]}"; do
        f="$(find "$moddir/drivers/virtio" "$moddir/drivers/block" "$moddir/drivers/net" "$moddir/net/core" \
            "$moddir/drivers/char" -name "$m.ko*" | head -n1)"
        [ -n "$f" ] || { log "module $m not found in $pkg"; exit 1; }
        case "$f" in
        *.ko) cp "$f" "$out/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$f" >"$out/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$out/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$out/modules/$m.ko" ;;
        esac
    done
    echo "$pkg" >"$out/kernel-package"
    cp "$(ls "$tmp"/root/boot/vmlinuz-* | head -n1)" "$out/vmlinuz.tmp"
    mv "$out/vmlinuz.tmp" "$out/vmlinuz"
    rm -rf "$tmp" "$out/kernel"
    rm -f "$out/initrd.img" # modules may have changed
fi

# --- initrd: busybox + virtio modules + /init ---
if [ ! -s "$out/initrd.img" ] || [ "${ISR_GUEST_REBUILD:-0}" = 1 ] || [ "${BASH_SOURCE[0]}" -nt "$out/initrd.img" ]; then
    stage="$out/initrd.stage"
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,dev,proc,sys,mnt,lib/modules}
    cp "$busybox_bin" "$stage/bin/busybox"
    for m in "${modules[@]}"; do cp "$out/modules/$m.ko" "$stage/lib/modules/"; done
    cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
# isr test guest: a counter kept in memory, appended to /mnt/counter every second.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "isr-guest: insmod $m failed"
done
# Network (user-mode NAT: 10.0.2.0/24, the host is 10.0.2.2) and the guest-agent channel, when present.
for m in failover net_failover virtio_net virtio_console; do insmod /lib/modules/$m.ko 2>/dev/null; done
if [ -e /sys/class/net/eth0 ]; then
    ip link set lo up
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
    echo "isr-net eth0"
else
    echo "isr-net none"
fi
# optional: isr_fetch=URL on the kernel command line makes the guest fetch URL every 2 s and print
# `isr-fetch carrier=C ok BODY` or `isr-fetch carrier=C failed` (C: eth0's carrier, 1 = link up), so a test
# sees the network as the guest sees it after every boot and resume.
for w in $(cat /proc/cmdline); do
    case "$w" in isr_fetch=*)
        url="${w#isr_fetch=}"
        # busybox nc, not wget (the static busybox's wget crashes in glibc's resolver without /etc files)
        hostport="${url#http://}"
        hostport="${hostport%%/*}"
        path="/${url#http://*/}"
        (while true; do
            carrier="$(cat /sys/class/net/eth0/carrier 2>/dev/null || echo none)"
            reply="$(printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$hostport" |
                nc -w 3 "${hostport%:*}" "${hostport##*:}" 2>/dev/null | tr -d '\r')"
            body="$(echo "$reply" | sed '1,/^$/d')"
            if [ "${reply#HTTP/1.* 200}" != "$reply" ] && [ -n "$body" ]; then
                echo "isr-fetch carrier=$carrier ok $body"
            else
                echo "isr-fetch carrier=$carrier failed"
            fi
            sleep 2
        done) &
        ;;
    esac
done
# Optional, for the RAM benchmarks (kernel command line):
# - isr_fill=MIB keeps MIB of random data in a tmpfs (RAM in use), then prints `isr-fill done`.
# - isr_tick prints `isr-tick N` every 0.1 s: the first tick after a resume is the guest running again.
# - isr_scan reads (checksums) the isr_fill data again and again and prints `isr-scan N` after each pass (a workload
#   that needs the RAM it keeps).
# - isr_memloop=MIB overwrites a MIB tmpfs file again and again and prints `isr-memloop N T` after each
#   pass (T: the guest's uptime in 1/100 s), a memory-write rate the host reads off the console.
for w in $(cat /proc/cmdline); do
    case "$w" in
    isr_fill=*)
        mkdir -p /fill && mount -t tmpfs -o size=90% fill /fill
        dd if=/dev/urandom of=/fill/data bs=1M count="${w#isr_fill=}" 2>/dev/null
        echo "isr-fill done"
        case " $(cat /proc/cmdline) " in *" isr_scan "*)
            (n=0; while true; do md5sum /fill/data >/dev/null; n=$((n + 1)); echo "isr-scan $n"; sleep 1; done) & ;;
        esac ;;
    isr_tick)
        (n=0; while true; do n=$((n + 1)); echo "isr-tick $n"; usleep 100000; done) & ;;
    isr_memloop=*)
        mkdir -p /loop && mount -t tmpfs -o size=90% loop /loop
        (n=0; while true; do
            dd if=/dev/zero of=/loop/data bs=1M count="${w#isr_memloop=}" conv=notrunc 2>/dev/null
            n=$((n + 1)); echo "isr-memloop $n $(cut -d' ' -f1 /proc/uptime | tr -d .)"
        done) & ;;
    esac
done
# A small stand-in for qemu-guest-agent on the virtio-serial port org.qemu.guest_agent.0: guest-sync,
# guest-ping, guest-get-time, guest-set-time, and guest-exec of a page-cache drop.
agent() {
    exec 3<>"$1"
    # A read returns end-of-file while the host side is not connected: wait and read again.
    while true; do
    while read -r req <&3; do
        cmd="$(echo "$req" | sed -n 's/.*"execute" *: *"\([a-z-]*\)".*/\1/p')"
        case "$cmd" in
        guest-sync | guest-sync-delimited)
            id="$(echo "$req" | sed -n 's/.*"id" *: *\([0-9]*\).*/\1/p')"
            echo "{\"return\": ${id:-0}}" >&3 ;;
        guest-ping) echo '{"return": {}}' >&3 ;;
        guest-get-time) echo "{\"return\": $(date +%s)000000000}" >&3 ;;
        guest-set-time)
            ns="$(echo "$req" | sed -n 's/.*"time" *: *\([0-9]*\).*/\1/p')"
            [ -n "$ns" ] && date -s "@$((ns / 1000000000))" >/dev/null
            echo '{"return": {}}' >&3 ;;
        guest-exec)
            case "$req" in *drop_caches*) sync; echo 3 >/proc/sys/vm/drop_caches ;; esac
            echo '{"return": {"pid": 1}}' >&3 ;;
        *) echo "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"$cmd\"}}" >&3 ;;
        esac
    done
    sleep 0.5
    done
}
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] || continue
    if [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ]; then
        agent "/dev/$(basename "$port")" &
        echo "isr-agent up"
    fi
done
# An interactive shell on the serial console too (`isr console`); the counter lines go there as well.
(setsid sh -c 'exec </dev/ttyS0 >/dev/ttyS0 2>&1; PS1="isr-serial# " exec sh') &
# An interactive shell on the first virtual terminal (the VGA screen, keyboard input).
if [ -c /dev/tty1 ]; then
    (setsid sh -c 'exec </dev/tty1 >/dev/tty1 2>&1; echo "isr test guest: a shell on tty1"; PS1="isr# " exec sh') &
fi
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then echo "isr-guest: no /dev/vda"; poweroff -f; fi
    sleep 0.1
done
mount -t ext4 /dev/vda /mnt || { echo "isr-guest: mount /dev/vda failed"; poweroff -f; }
# optional: isr_stop_at=N on the kernel command line powers the guest off once the counter reaches N
stop_at=0
for w in $(cat /proc/cmdline); do
    case "$w" in isr_stop_at=*) stop_at="${w#isr_stop_at=}" ;; esac
done
n="$(tail -n 1 /mnt/counter 2>/dev/null)"
case "$n" in '' | *[!0-9]*) n=0 ;; esac
echo "isr-boot $n"
while true; do
    sleep 1
    n=$((n + 1))
    echo "$n" >>/mnt/counter
    sync
    echo "isr-counter $n"
    if [ "$stop_at" -gt 0 ] && [ "$n" -ge "$stop_at" ]; then
        umount /mnt
        echo "isr-poweroff"
        poweroff -f
    fi
done
EOF
    chmod 755 "$stage/init"
    (cd "$stage" && find . | sort | cpio -o -H newc --quiet | gzip -9 >"$out/initrd.img.tmp")
    mv "$out/initrd.img.tmp" "$out/initrd.img"
    rm -rf "$stage"
fi

# --- disk ---
if [ ! -s "$out/disk.img" ]; then
    truncate -s 64M "$out/disk.img.tmp"
    mkfs.ext4 -F -q "$out/disk.img.tmp"
    mv "$out/disk.img.tmp" "$out/disk.img"
fi

echo "kernel: $out/vmlinuz"
echo "initrd: $out/initrd.img"
echo "disk:   $out/disk.img"
echo "append: console=ttyS0 quiet panic=-1 init_on_free=1"

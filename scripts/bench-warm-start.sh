#!/usr/bin/env bash
# Measures how soon a KVM build's first command can run in the test guest (issue 24,
# docs/plan-issue-24.md): three ways of having a throw-away guest ready.
#
#   scripts/bench-warm-start.sh [RUNS] [cold|pool|restore ...]
#
#   cold     today's path: a fresh qcow2 overlay, qemu started, ssh probed until it answers;
#            the figure is from `qemu-img create` to the first successful `ssh ... true`.
#   pool     a guest booted ahead on its own fresh overlay (not timed); the figure is from the
#            "take" to the first command's answer (`ssh ... true`), and the health check
#            (clock, free space) as a second figure; then both again through an ssh control
#            master opened while the guest waited (no key exchange at the take).
#   restore  once: a template guest booted on overlay T (base <- T), saved with qemu's `migrate`
#            to a file while running, T frozen. Each run: a fresh overlay R on T (base <- T <- R),
#            qemu started with the same command line plus `-incoming "exec:cat STATE"`; the figure
#            is from `qemu-img create` of R to the first successful `ssh ... true`. Also printed:
#            how far the guest's clock is behind the host's after the restore.
#
# The guest is scripts/make-test-guest.sh's (run it first), under TCG, the qemu command line the
# builder uses (src/imaging/kvm/commands.rs, qemu_system) with -m 1G -smp 2. qemu runs under
# `nice -n 10`; one guest at a time; every qemu this script started is killed at its exit.
set -euo pipefail

runs=${1:-3}
shift || true
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(cold pool restore)

guest=${BUILD_IMAGE_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/build-image/test-guest}/guest
[ -s "$guest/base.qcow2" ] || { echo "no test guest in $guest: run scripts/make-test-guest.sh" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/var/tmp}/bench-warm.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        # only a qemu whose command line names this script's work directory
        if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -q -- "$work"; then
            kill -9 "$p" 2>/dev/null || true
        fi
    done
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ssh_opts=(-o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null
    -o LogLevel=ERROR -o IdentitiesOnly=yes -o ConnectTimeout=10 -i "$guest/id_ed25519")
gssh() { local port=$1; shift; ssh "${ssh_opts[@]}" -p "$port" root@127.0.0.1 "$@"; }

# start_qemu NAME DISK PORT [extra args...]: the builder's command line; sets $pid
start_qemu() {
    local name=$1 disk=$2 port=$3
    shift 3
    nice -n 10 qemu-system-x86_64 -machine accel=tcg -display none -no-reboot -daemonize \
        -pidfile "$work/$name.pid" -m 1G -smp 2 -device virtio-rng-pci \
        -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 panic=1" \
        -net nic,model=virtio,macaddr=DE:AD:BE:EF:12:34 \
        -net "user,hostfwd=tcp:127.0.0.1:$port-:22" \
        -drive "index=0,if=virtio,media=disk,cache=writeback,format=qcow2,file=$disk" \
        -chardev "file,id=console,path=$work/$name.console" -serial chardev:console \
        -monitor "unix:$work/$name.mon,server=on,wait=off" "$@"
    pid=$(cat "$work/$name.pid")
    pids+=("$pid")
}

# wait_ssh PORT: probes `ssh true` until it answers (at most 300 s)
wait_ssh() {
    local port=$1 end=$(($(date +%s) + 300))
    until gssh "$port" true 2>/dev/null; do
        [ "$(date +%s)" -lt "$end" ] || { echo "ssh on $port never answered" >&2; return 1; }
        kill -0 "$pid" 2>/dev/null || { echo "qemu $pid died" >&2; return 1; }
        sleep 0.2
    done
}

stop_qemu() {
    kill -9 "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

mon() { echo "$2" | socat - "UNIX-CONNECT:$work/$1.mon" >/dev/null; }

cold() {
    local i t port
    for i in $(seq "$runs"); do
        port=$(free_port)
        t=$(now)
        qemu-img create -q -f qcow2 -F qcow2 -b "$guest/base.qcow2" "$work/cold$i.qcow2"
        start_qemu "cold$i" "$work/cold$i.qcow2" "$port"
        wait_ssh "$port"
        echo "cold run $i: $(since "$t") s from overlay to first command"
        stop_qemu
        rm -f "$work/cold$i.qcow2"
    done
}

pool() {
    local i t port
    for i in $(seq "$runs"); do
        port=$(free_port)
        qemu-img create -q -f qcow2 -F qcow2 -b "$guest/base.qcow2" "$work/pool$i.qcow2"
        start_qemu "pool$i" "$work/pool$i.qcow2" "$port"
        wait_ssh "$port"
        # the pool's guest idles as a warm one would before a build takes it
        gssh "$port" 'systemctl is-system-running --wait' >/dev/null 2>&1 || true
        t=$(now)
        gssh "$port" true
        local first
        first=$(since "$t")
        t=$(now)
        gssh "$port" 'date +%s; df -Pk / | tail -1' >"$work/health"
        echo "pool run $i: first command ${first} s after take; health check (clock, df) $(since "$t") s; guest-host clock $(($(head -1 "$work/health") - $(date +%s))) s"
        # the same with an ssh connection opened while the guest waits (a control master): a
        # take's commands open a session on it, no new key exchange
        ssh "${ssh_opts[@]}" -o ControlMaster=yes -o "ControlPath=$work/pool$i.ctl" -o ControlPersist=yes \
            -f -N -p "$port" root@127.0.0.1
        t=$(now)
        gssh "$port" -o "ControlPath=$work/pool$i.ctl" true
        first=$(since "$t")
        t=$(now)
        gssh "$port" -o "ControlPath=$work/pool$i.ctl" 'date +%s; df -Pk / | tail -1' >"$work/health"
        echo "pool run $i (control master): first command ${first} s after take; health check $(since "$t") s"
        ssh -o "ControlPath=$work/pool$i.ctl" -O exit root@127.0.0.1 2>/dev/null || true
        stop_qemu
        rm -f "$work/pool$i.qcow2"
    done
}

restore() {
    local i t port state=$work/state
    port=$(free_port)
    qemu-img create -q -f qcow2 -F qcow2 -b "$guest/base.qcow2" "$work/template.qcow2"
    t=$(now)
    start_qemu template "$work/template.qcow2" "$port"
    wait_ssh "$port"
    gssh "$port" 'systemctl is-system-running --wait' >/dev/null 2>&1 || true
    echo "restore: template booted in $(since "$t") s"
    t=$(now)
    # saved while running: the state says "running", so the restored guest runs at once
    mon template "migrate \"exec:cat > $state\""
    until echo "info migrate" | socat - "UNIX-CONNECT:$work/template.mon" | grep -q "Migration status: completed"; do
        echo "info migrate" | socat - "UNIX-CONNECT:$work/template.mon" | grep -q "Migration status: failed" &&
            { echo "migration failed" >&2; return 1; }
        sleep 0.1
    done
    echo "restore: state saved in $(since "$t") s, $(du -m "$state" | cut -f1) MiB ($(stat -c %s "$state") bytes)"
    stop_qemu
    for i in $(seq "$runs"); do
        port=$(free_port)
        t=$(now)
        qemu-img create -q -f qcow2 -F qcow2 -b "$work/template.qcow2" "$work/restore$i.qcow2"
        start_qemu "restore$i" "$work/restore$i.qcow2" "$port" -incoming "exec:cat $state"
        wait_ssh "$port"
        local first
        first=$(since "$t")
        echo "restore run $i: $first s from overlay to first command; guest-host clock $(($(gssh "$port" 'date +%s') - $(date +%s))) s"
        stop_qemu
        rm -f "$work/restore$i.qcow2"
    done
}

echo "bench-warm-start: $(nproc) cores, qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), TCG, guest $guest"
for m in "${modes[@]}"; do "$m"; done

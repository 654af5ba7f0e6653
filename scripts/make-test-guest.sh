#!/usr/bin/env bash
# Builds the small Debian guest that the KVM tests (tests/kvm.rs) boot, from Debian packages only.
#
#   scripts/make-test-guest.sh [CACHE_DIR]
#
# CACHE_DIR (default $BUILD_IMAGE_GUEST_CACHE, else ~/.cache/build-image/test-guest) keeps the
# downloaded .debs (debs/) and the finished guest (guest/):
#   guest/base.qcow2    the root file system (ext4 on the whole disk, /dev/vda), qcow2
#   guest/vmlinuz       the guest kernel (Debian's linux-image-cloud-amd64: small, quick to boot)
#   guest/initrd.img    its initrd (virtio drivers are modules)
#   guest/vmlinuz-9p    a kernel with 9p over virtio (the cloud one when it has 9p, else
#   guest/initrd-9p.img Debian's generic linux-image-amd64), and its initrd
#   guest/id_ed25519    the private key root@guest accepts (mode 0600)
#   guest/has-9p        "yes" when vmlinuz-9p has 9p over virtio (CONFIG_9P_FS, CONFIG_NET_9P_VIRTIO)
#   guest/stamp         what the guest was built from; a run with the same inputs does nothing
#
# The guest: debootstrap minbase + systemd + openssh-server + the cloud kernel; a static address
# for qemu's user-mode network (10.0.2.15/24), root login by key only, and tests/fixtures/mic (the
# mic stand-in) installed as /usr/bin/mic. Needs root (debootstrap, chroot), debootstrap,
# e2fsprogs (mkfs.ext4 -d), qemu-utils and ssh-keygen. The Debian mirror is the first one in this
# host's apt sources, or $MIRROR.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=${1:-${BUILD_IMAGE_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/build-image/test-guest}}
suite=${SUITE:-bookworm}
packages=systemd-sysv,udev,kmod,iproute2,openssh-server,initramfs-tools,linux-image-cloud-amd64,linux-image-amd64

die() { echo "make-test-guest: $*" >&2; exit 1; }

mirror=${MIRROR:-}
if [ -z "$mirror" ]; then
    # deb822 sources first (URIs: ...), then one-line sources (deb URI suite ...): the first
    # Debian archive (not the security one) this host already uses.
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }')
    if [ -z "$mirror" ]; then
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
            awk '$1 == "deb" && $2 !~ /security/ { print $2; exit }')
    fi
fi
[ -n "$mirror" ] || die "no Debian mirror in this host's apt sources: set MIRROR"

mkdir -p "$cache/debs"
cache=$(cd "$cache" && pwd)
out=$cache/guest

stamp=$(
    {
        echo "suite=$suite packages=$packages"
        sha256sum <"$0"
        sha256sum <"$here/tests/fixtures/mic"
    } | sha256sum | cut -d' ' -f1
)

# One builder at a time; the others wait and then find the guest ready.
exec 9>"$cache/.lock"
flock 9

ready() {
    [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ] &&
        for f in base.qcow2 vmlinuz initrd.img id_ed25519 has-9p; do [ -s "$out/$f" ] || return 1; done &&
        { [ "$(cat "$out/has-9p")" != yes ] || [ -s "$out/vmlinuz-9p" ]; }
}
if ready; then
    echo "make-test-guest: $out is up to date"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and chroot)"
for tool in debootstrap mkfs.ext4 qemu-img ssh-keygen; do
    command -v "$tool" >/dev/null || die "$tool is not installed"
done

work=$(mktemp -d "$cache/work.XXXXXX")
cleanup() {
    # debootstrap may leave /proc or /sys mounted in the tree after a failure
    for m in proc sys dev/pts dev; do umount -l "$work/root/$m" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
root=$work/root
started=$(date +%s)

echo "make-test-guest: debootstrap $suite from $mirror into $root"
debootstrap --variant=minbase --cache-dir="$cache/debs" --include="$packages" \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }

echo guest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 guest\n' >"$root/etc/hosts"
echo '/dev/vda / ext4 rw,relatime 0 1' >"$root/etc/fstab"

# qemu's user-mode network: the guest is 10.0.2.15, the gateway 10.0.2.2, DNS 10.0.2.3.
# A static address: no DHCP client needed, no wait.
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-slirp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
EOF
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
# nothing the tests need, and slow under emulation
for unit in apt-daily.timer apt-daily-upgrade.timer fstrim.timer e2scrub_all.timer \
    systemd-networkd-wait-online.service; do
    chroot "$root" systemctl mask "$unit" >/dev/null 2>&1 || true
done

# root by key only
ssh-keygen -q -t ed25519 -N '' -C build-image-test -f "$work/id_ed25519"
install -d -m 0700 "$root/root/.ssh"
install -m 0600 "$work/id_ed25519.pub" "$root/root/.ssh/authorized_keys"
mkdir -p "$root/etc/ssh/sshd_config.d"
printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' \
    >"$root/etc/ssh/sshd_config.d/build-image-test.conf"

# the mic stand-in, where mic lives
install -m 0755 "$here/tests/fixtures/mic" "$root/usr/bin/mic"
mkdir -p "$root/etc/mic" "$root/etc/sysconfig"

# Small initrds: only what finds the root disk (and the network and 9p devices). Both kernels
# keep all their modules in the root file system.
echo MODULES=list >"$root/etc/initramfs-tools/conf.d/build-image-test"
printf '%s\n' virtio_pci virtio_blk virtio_net virtio_rng ext4 >>"$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all >"$work/initramfs.log" 2>&1 ||
    { tail -n 20 "$work/initramfs.log" >&2; die "update-initramfs failed (log above)"; }

has_9p() { grep -Eq '^CONFIG_9P_FS=(y|m)' "$1" && grep -Eq '^CONFIG_NET_9P_VIRTIO=(y|m)' "$1"; }
kernel="" initrd="" kernel9p="" initrd9p=""
for config in $(ls "$root"/boot/config-* | sort -V); do
    version=${config##*/config-}
    k=$root/boot/vmlinuz-$version i=$root/boot/initrd.img-$version
    [ -s "$k" ] && [ -s "$i" ] || die "no kernel or initrd for $version under $root/boot"
    case "$version" in *-cloud-*) kernel=$k initrd=$i ;; esac
    if has_9p "$config" && { [ -z "$kernel9p" ] || [[ "$version" == *-cloud-* ]]; }; then
        kernel9p=$k initrd9p=$i
    fi
done
[ -n "$kernel" ] || die "no cloud kernel under $root/boot"
has9p=no
[ -n "$kernel9p" ] && has9p=yes

mkdir -p "$work/guest"
cp "$kernel" "$work/guest/vmlinuz"
cp "$initrd" "$work/guest/initrd.img"
if [ "$has9p" = yes ]; then
    cp "$kernel9p" "$work/guest/vmlinuz-9p"
    cp "$initrd9p" "$work/guest/initrd-9p.img"
fi
install -m 0600 "$work/id_ed25519" "$work/guest/id_ed25519"
echo "$has9p" >"$work/guest/has-9p"
rm -f "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*_* 2>/dev/null || true

# the tree's size plus room for the builds, at least 1 GiB
used_mb=$(du -sxm "$root" | cut -f1)
size_mb=$((used_mb + 768))
[ "$size_mb" -ge 1024 ] || size_mb=1024
mkfs.ext4 -q -F -L guestroot -d "$root" "$work/root.img" "${size_mb}M"
qemu-img convert -O qcow2 "$work/root.img" "$work/guest/base.qcow2"
rm -f "$work/root.img"
echo "$stamp" >"$work/guest/stamp"

rm -rf "$out"
mv "$work/guest" "$out"
echo "make-test-guest: $out ready in $(($(date +%s) - started)) s (kernel $(basename "$kernel"); 9p: $has9p${kernel9p:+, $(basename "$kernel9p")})"

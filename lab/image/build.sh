#!/usr/bin/env bash
# Build the lab base image: Debian bookworm by debootstrap from the mirror apt already uses,
# booted by systemd, with python3 for Ansible, imported into podman as smtpgw-lab:<recipe-hash>.
#
# The image is keyed on a hash of this recipe (this file and packages.txt): when an image with
# that tag exists the build is skipped, so a second set-up takes seconds.
#
# packages.txt also lists the packages the lab roles install (postfix, dovecot, ...): they are
# baked in as a download cache so tests do not fetch them on every run. Their services are
# disabled in the image; the roles still declare, enable and start what they need.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
name=${SMTPGW_LAB_IMAGE_NAME:-smtpgw-lab}
recipe_hash=$(cat "$here/build.sh" "$here/packages.txt" | sha256sum | cut -c1-12)
tag="$name:$recipe_hash"

fail() {
    echo "smtpgw: lab image build failed: $*" >&2
    exit 1
}

# One build at a time (a second set-up waits for the first, then finds the image).
exec 9>/var/tmp/smtpgw-image.lock
flock 9

# A killed build leaves its work folder behind, with proc/sys still mounted in the chroot:
# unmount before removing, never rm -rf through a live mount.
cleanup_dir() {
    findmnt -rn -o TARGET | grep -F "$1/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf --one-file-system "$1"
}
for stale in /var/tmp/smtpgw-image.*; do
    [ -d "$stale" ] && cleanup_dir "$stale"
done

if podman image exists "$tag"; then
    echo "lab image $tag is up to date (recipe unchanged)"
    podman tag "$tag" "$name:latest"
    exit 0
fi

mirror=${SMTPGW_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # The mirror apt already uses: deb822 sources first, then the classic list.
    mirror=$(grep -hoE '^URIs: *http[^ ]+' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v security | head -n1 | sed 's/^URIs: *//' || true)
    [ -n "$mirror" ] || mirror=$(grep -hoE '^deb +http[^ ]+' /etc/apt/sources.list 2>/dev/null |
        grep -v security | head -n1 | awk '{print $2}' || true)
fi
[ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt; set SMTPGW_DEBIAN_MIRROR=http://..."

packages=$(grep -v '^#' "$here/packages.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
work=$(mktemp -d /var/tmp/smtpgw-image.XXXXXX)
trap 'cleanup_dir "$work"' EXIT
root="$work/rootfs"

echo "building lab image $tag from $mirror (debootstrap, a few minutes)"
if ! debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    fail "debootstrap could not build bookworm from $mirror (log above); check that the mirror is reachable"
fi

# Services the roles own start only when a role enables them.
for unit in postfix dovecot named rspamd redis-server nftables; do
    chroot "$root" systemctl disable "$unit" >/dev/null 2>&1 || true
done
# Units that make no sense in a container, and slow its boot.
for unit in systemd-timesyncd apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
    fstrim.timer systemd-resolved getty@tty1 console-getty; do
    chroot "$root" systemctl mask "$unit" >/dev/null 2>&1 || true
done
# The same apt sources as the machine, so roles can install more packages in the lab.
cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/" 2>/dev/null || true
rm -f "$root/etc/apt/sources.list"
[ -s "$root/etc/apt/sources.list.d/debian.sources" ] ||
    echo "deb $mirror bookworm main" >"$root/etc/apt/sources.list"
echo 'smtpgw-lab' >"$root/etc/hostname"
: >"$root/etc/machine-id"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

if ! tar -C "$root" -c . | podman import \
    --change 'CMD ["/sbin/init"]' --change 'STOPSIGNAL SIGRTMIN+3' - "$tag" >/dev/null; then
    fail "podman import did not take the image; run 'podman info' to see whether podman works"
fi
podman tag "$tag" "$name:latest"
# Older builds of the recipe are of no further use.
podman images --format '{{.Repository}}:{{.Tag}}' | grep -E "^(localhost/)?$name:" |
    grep -vE ":($recipe_hash|latest)$" | xargs -r podman rmi >/dev/null 2>&1 || true
echo "lab image $tag built"

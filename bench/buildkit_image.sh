#!/usr/bin/env bash
# Make a local buildctl image from a genuine buildctl binary and busybox (`docker import` of a
# rootfs holding them), for bench/launchers.py --genuine. The image is not pushed or committed.
#
#   bash bench/buildkit_image.sh /path/to/buildctl [IMAGE]      # IMAGE: moby/buildkit:v0.21.0
#
# Uses the engine of DOCKER_HOST (e.g. `export "$(bash .ci/dockerd.sh | tail -n1)"`).
set -euo pipefail

BUILDCTL=${1:?usage: buildkit_image.sh /path/to/buildctl [image]}
IMAGE=${2:-moby/buildkit:v0.21.0}
BUSYBOX=$(command -v busybox) || { echo "busybox is needed (apt-get install busybox-static)" >&2; exit 1; }
[[ -x "$BUILDCTL" ]] || { echo "$BUILDCTL is not an executable" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root="$tmp/rootfs"
mkdir -p "$root/bin" "$root/usr/bin" "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
chmod 1777 "$root/tmp"
cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [[ "$applet" == busybox ]] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$BUILDCTL" "$root/usr/bin/buildctl"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
tar -C "$root" --owner=0 --group=0 --numeric-owner -cf - . |
    docker import --change 'ENV PATH=/usr/bin:/bin' --change 'ENTRYPOINT ["buildctl"]' - "$IMAGE" >/dev/null
echo "$IMAGE: $(docker run --rm "$IMAGE" --version)"

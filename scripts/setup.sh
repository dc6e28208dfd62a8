#!/usr/bin/env bash
# Installs what lockstep needs on a Debian bookworm machine, as root, idempotently:
# the Debian packages (only those missing), then the venv with the project in it
# (redone only when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."

# nftables: the tests block the clock-probe path with a real firewall rule;
# xfsprogs: the memory benchmark makes a reflink-capable xfs on a loop device;
# chromium: a test opens `lockstep run`'s HTML report in it, headless, and checks what it draws;
# libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients: a libvirtd per lab host
# (`lab up --driver libvirt`) and virsh; libvirt-dev, pkg-config, gcc, python3-dev:
# libvirt-python builds against them.
PACKAGES=(qemu-system-x86 qemu-utils debootstrap e2fsprogs busybox-static iproute2
          cpio tcpdump procps ca-certificates nftables xfsprogs chromium
          libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc python3-dev)
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ "$(id -u)" != 0 ]; then
    echo "setup: lockstep's lab needs root (namespaces, taps, QEMU); run as root" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd's QEMU driver will not start without its user, even when its qemu.conf runs QEMU
# as root (the lab's does); Debian's libvirt-daemon-system makes it so.
if ! getent passwd libvirt-qemu >/dev/null; then
    echo "setup: adding the system user libvirt-qemu (libvirtd's QEMU driver wants it)"
    useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt \
        --shell /usr/sbin/nologin libvirt-qemu
fi

stamp="$VENV/.lockstep-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing lockstep and its dependencies into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".[dev,libvirt]"
    echo "$want" > "$stamp"
fi

#!/bin/sh
# Installs what the thvc-nodeagent tests need on Debian (run as root; CI calls this).
# dbus-daemon: private buses; systemd: busctl and systemd-stdio-bridge;
# util-linux: unshare/nsenter; iproute2: ip; openssl: the HTTPS image server;
# e2fsprogs (mkfs.ext4) and busybox-static: the guest root disk of tests/vm_guest.rs
# (filefrag: tests/disks.rs); qemu-utils (qemu-img, qemu-io): image imports and the
# test images of tests/disks.rs; xfsprogs (mkfs.xfs): the reflink test's file system;
# openssh-server (sshd) and openssh-client (ssh, ssh-keygen): the live migration test's link.
set -eu
missing=""
command -v dbus-daemon >/dev/null 2>&1 || missing="$missing dbus-daemon"
command -v busctl >/dev/null 2>&1 || missing="$missing systemd"
command -v systemd-stdio-bridge >/dev/null 2>&1 || missing="$missing systemd"
command -v nsenter >/dev/null 2>&1 || missing="$missing util-linux"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v openssl >/dev/null 2>&1 || missing="$missing openssl"
command -v mkfs.ext4 >/dev/null 2>&1 || missing="$missing e2fsprogs"
command -v qemu-img >/dev/null 2>&1 || missing="$missing qemu-utils"
command -v qemu-io >/dev/null 2>&1 || missing="$missing qemu-utils"
command -v mkfs.xfs >/dev/null 2>&1 || missing="$missing xfsprogs"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
command -v ssh-keygen >/dev/null 2>&1 || missing="$missing openssh-client"
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
    missing="$missing busybox-static"
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # No package may start its daemon here (openssh-server's sshd): the tests run their own.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing
fi

#!/bin/sh
# Installs what the thvc-nodeagent tests need on Debian (run as root; CI calls this).
# dbus-daemon: private buses; systemd: busctl and systemd-stdio-bridge;
# util-linux: unshare/nsenter; iproute2: ip.
set -eu
missing=""
command -v dbus-daemon >/dev/null 2>&1 || missing="$missing dbus-daemon"
command -v busctl >/dev/null 2>&1 || missing="$missing systemd"
command -v systemd-stdio-bridge >/dev/null 2>&1 || missing="$missing systemd"
command -v nsenter >/dev/null 2>&1 || missing="$missing util-linux"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing
fi

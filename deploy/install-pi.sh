#!/usr/bin/env bash
# Install a fedbell doorbell node on a Raspberry Pi (64-bit Raspberry Pi OS).
#
#   On the server, in the fedbell checkout:
#                   sudo /opt/fedbell/venv/bin/python -m deploy.provision add-device door1
#                   scp -r /etc/fedbell/site/clients/door1 pi@door1.lan:door1
#   On the Pi:      sudo deploy/install-pi.sh --bundle ~/door1
#
# Safe to run again (after an upgrade, or with a re-provisioned bundle).
#
# Options:
#   --bundle DIR    the device's provisioned folder (required)
#   --prefix DIR    install under DIR instead of / (a trial run; no users)
#   --venv DIR      virtualenv to create or reuse (default PREFIX/opt/fedbell/venv)
#   --python PATH   interpreter for the venv (default /usr/bin/python3: apt's
#                   picamera2 only works with the system Python)
#   --no-apt        do not install Debian packages
#   --no-pip        do not pip-install fedbell into the venv
#   --no-camera     no camera on this machine: no picamera2, no camera check
#   --no-systemd    install the unit file but do not enable or start it
#   --keep-bundle   do not delete the bundle afterwards (by default it is removed
#                   once installed: it holds the doorbell's private keys and
#                   broker password, which must live only in the root-only
#                   /etc/fedbell/credentials/<device>/)
# shellcheck source=deploy/lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUNDLE=""
CAMERA=yes
KEEP_BUNDLE=no
while [[ $# -gt 0 ]]; do
    case $1 in
        --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
        --no-camera) CAMERA=no; shift ;;
        --keep-bundle) KEEP_BUNDLE=yes; shift ;;
        *) common_option "$@"; shift "$OPTION_WORDS" ;;
    esac
done
[[ -n $BUNDLE ]] || die "--bundle DIR is required (see --help)"
set_prefix "$PREFIX"
VENV=${VENV:-$ROOT/opt/fedbell/venv}
require_root

step "Checking the bundle $BUNDLE"
[[ -f $BUNDLE/edge.yaml ]] || die "$BUNDLE/edge.yaml missing: pass a folder made by 'provision add-device'"
DEVICE=$(sed -n 's/^device_id: *\([a-z0-9_-]*\) *$/\1/p' "$BUNDLE/edge.yaml")
[[ -n $DEVICE ]] || die "no device_id in $BUNDLE/edge.yaml"
note "device: $DEVICE"
peer_keys=("$BUNDLE"/peer-keys/*.pub)
if [[ ${#peer_keys[@]} -eq 0 ]]; then
    note "warning: no aggregator key in the bundle yet; run 'provision add-aggregator'"
    note "on the server, copy the bundle again and re-run this script"
fi
arch=$(uname -m)
[[ $arch == aarch64 ]] || note "note: $arch, not aarch64 (64-bit Raspberry Pi OS is what this targets)"

step "Debian packages"
if [[ $APT == yes ]]; then
    packages=(python3 python3-venv python3-pip mosquitto-clients ca-certificates)
    [[ $CAMERA == yes ]] && packages+=(python3-picamera2 rpicam-apps)
    apt_install "${packages[@]}"
else
    note "skipped (--no-apt)"
fi

step "Service user and groups"
if real_install; then
    ensure_group video
    ensure_group gpio
    ensure_service_user
else
    note "skipped for a --prefix install"
fi

step "Python environment in $VENV (fedbell with LiteRT, no TensorFlow)"
# No TensorFlow: a doorbell runs the backbone with LiteRT and trains its head
# with numpy (edge/trainer.py); the aggregator converts and ships the models.
make_venv "$PYTHON" "$VENV" yes "$PIP" "pi"

step "Configuration and credentials for $DEVICE"
run install -d -m 0755 "$ROOT/etc/fedbell" "$ROOT/etc/fedbell/keys/aggregator"
install_config "$BUNDLE/edge.yaml" "$ROOT/etc/fedbell/edge-$DEVICE.yaml"
install_credentials "$BUNDLE" "$DEVICE" ca.crt client.crt client.key mqtt-password signing.key
# The aggregator's public key(s): exactly those of the bundle, so a rotated
# key replaces the old one.
for old in "$ROOT"/etc/fedbell/keys/aggregator/*.pub; do
    [[ -f $BUNDLE/peer-keys/$(basename "$old") ]] || run rm -f "$old"
done
for key in "${peer_keys[@]}"; do
    run install -m 0644 "$key" "$ROOT/etc/fedbell/keys/aggregator/"
done

step "Removing the bundle $BUNDLE (its secrets are installed)"
if [[ $KEEP_BUNDLE == yes ]]; then
    note "kept (--keep-bundle): it holds private keys; delete it yourself"
else
    # Only the files the provisioner writes, never a recursive delete of a
    # folder the user named: the secrets are overwritten before unlinking.
    for file in mqtt-password client.key signing.key; do
        if [[ -f $BUNDLE/$file ]]; then
            if command -v shred >/dev/null; then run shred -u "$BUNDLE/$file"; else run rm -f "$BUNDLE/$file"; fi
        fi
    done
    for file in edge.yaml ca.crt client.crt signing.pub; do
        if [[ -f $BUNDLE/$file ]]; then run rm -f "$BUNDLE/$file"; fi
    done
    for key in "${peer_keys[@]}"; do
        run rm -f "$key"
    done
    if [[ -d $BUNDLE/peer-keys ]]; then run rmdir "$BUNDLE/peer-keys"; fi
    run rmdir "$BUNDLE" || note "warning: $BUNDLE is not empty: other files were left there"
fi

step "systemd unit fedbell-edge@.service"
install_text "$FEDBELL_SRC/systemd/fedbell-edge@.service" \
    "$ROOT/etc/systemd/system/fedbell-edge@.service" 0644

step "Camera"
if [[ $CAMERA == no ]]; then
    note "skipped (--no-camera)"
elif command -v rpicam-hello >/dev/null; then
    rpicam-hello --list-cameras || note "warning: rpicam-hello lists no camera"
else
    videos=(/dev/video*)
    note "video devices: ${videos[*]:-none}"
fi

step "Memory controller (the unit's MemoryHigh=/MemoryMax=)"
# Raspberry Pi OS kernels start with the memory cgroup off: without it systemd
# silently ignores the unit's memory budget. cgroup_enable=memory turns it on.
if ! real_install; then
    note "skipped for a --prefix install"
elif grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    note "enabled: the unit's memory budget is enforced"
else
    cmdline=/boot/firmware/cmdline.txt
    [[ -f $cmdline ]] || cmdline=/boot/cmdline.txt
    if [[ -f $cmdline ]]; then
        grep -qw "cgroup_enable=memory" "$cmdline" \
            || run sed -i '1 s/$/ cgroup_enable=memory cgroup_memory=1/' "$cmdline"
        note "warning: the memory controller comes on at the next reboot ($cmdline);"
        note "until then the unit's MemoryHigh=/MemoryMax= are not enforced"
    else
        note "warning: no memory controller and no cmdline.txt: MemoryHigh=/MemoryMax= not enforced"
    fi
fi

step "Starting fedbell-edge@$DEVICE.service"
if [[ $SYSTEMD == no ]]; then
    note "skipped (--no-systemd); to start: systemctl enable --now fedbell-edge@$DEVICE.service"
elif ! systemd_running; then
    die "systemd is not running here: use --no-systemd"
else
    run systemctl daemon-reload
    run systemctl enable "fedbell-edge@$DEVICE.service"
    run systemctl restart "fedbell-edge@$DEVICE.service"
    run systemctl --no-pager --lines=5 status "fedbell-edge@$DEVICE.service" || true
fi

step "Done: doorbell $DEVICE installed"
note "logs: journalctl -u fedbell-edge@$DEVICE -f"

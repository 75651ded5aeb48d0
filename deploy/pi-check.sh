#!/usr/bin/env bash
# make pi-check: the doorbell's install and code on arm64, under emulation.
#
#   sudo deploy/pi-check.sh [--work DIR] [--gallery N (15)] [--fresh]
#                           [--trainable head|last_level (head)]
#
# 1. Builds a Debian bookworm arm64 root the way Raspberry Pi OS 64-bit is
#    built (debootstrap --foreign --arch arm64, then its second stage run by
#    qemu-user-static through binfmt_misc), from Debian's packages only.
# 2. Puts there what Raspberry Pi OS's camera stack brings that a venv can
#    trip over: apt's python3-numpy (1.24) and a simplejpeg compiled against
#    it (as python3-simplejpeg is on Raspberry Pi OS; Debian has no such
#    package, so it is the PyPI release of that era, installed into
#    /usr/lib/python3/dist-packages).
# 3. Runs deploy/install-pi.sh inside it as on a Pi with no systemd and no
#    camera (--no-systemd --no-camera), with a bundle made by the real
#    provisioner, and checks that every compiled package in the venv is an
#    aarch64 wheel, that TensorFlow is absent, and that the venv's numpy and
#    simplejpeg work together where apt's simplejpeg would not.
# 4. Runs `python -m bench.edge --chroot ROOT` on this machine: a Mosquitto and
#    the real aggregator here, the doorbell (`python -m edge`, arm64, emulated)
#    in the root over loopback: enrollment from a folder (`edge enroll`), the
#    backbone over MQTT, recognition of a replayed porch video (folder camera),
#    eight real rounds (edge/trainer.py train_delta) and their updates, then
#    eight secure rounds (the product's default) with four helper doorbells on
#    this machine: the doorbell's own time in each phase against a plain round's.
#    --trainable last_level: the aggregator trains dlib's last level too
#    (rounds.trainable), so the doorbell runs the cut backbone and trains the level.
#
# The work folder (default /var/tmp/fedbell-pi) is kept between runs: the root
# is bootstrapped once (--fresh starts over). Needs root (chroot, mounts) and
# the network (deb.debian.org, pypi.org).
set -Eeuo pipefail

WORK=/var/tmp/fedbell-pi
GALLERY=15
FRESH=no
TRAINABLE="head"
MIRROR=http://deb.debian.org/debian
while [[ $# -gt 0 ]]; do
    case $1 in
        --work) WORK=${2:?--work needs a folder}; shift 2 ;;
        --gallery) GALLERY=${2:?--gallery needs a number}; shift 2 ;;
        --fresh) FRESH=yes; shift ;;
        --trainable) TRAINABLE=${2:?--trainable needs head or last_level}; shift 2 ;;
        -h | --help) sed -n '2,/^set -E/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "pi-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$WORK/root
HOST_PY=$SRC/.venv/bin/python
DEVICE=pidoor
START=$(date +%s)
declare -a RESULTS=()

step() { printf '\n==> %s\n' "$*"; }
stamp() { printf '%(%H:%M:%S)T' -1; }
elapsed() { echo $(($(date +%s) - $1)); }
result() { RESULTS+=("$(printf '%-4s %-62s %6ss' "$1" "$2" "$3")"); }
HOST_CA=/etc/ssl/certs/pi-check-host-ca.crt
in_root() {
    # A clean environment: nothing of this machine's pip or Python settings leaks in,
    # except the certificate authorities it trusts (a network whose TLS proxy only
    # this machine trusts would otherwise keep pip from PyPI; a Pi there needs the same).
    chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive PIP_CERT="$HOST_CA" "$@"
}

[[ $(id -u) -eq 0 ]] || { echo "pi-check: run as root (chroot, mounts, debootstrap)" >&2; exit 1; }
[[ -x $HOST_PY ]] || { echo "pi-check: $HOST_PY missing: run 'make deps' first" >&2; exit 1; }
mkdir -p "$WORK"

unmount_all() {
    local mount
    for mount in dev/pts dev sys proc; do
        if mountpoint -q "$ROOT/$mount"; then umount -l "$ROOT/$mount" || true; fi
    done
}
trap unmount_all EXIT

step "$(stamp) Host tools: debootstrap, qemu-user-static, binfmt_misc"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
[[ -x /usr/bin/qemu-aarch64-static ]] || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
if [[ ${#missing[@]} -gt 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || update-binfmts --enable qemu-aarch64
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || { echo "pi-check: binfmt_misc has no enabled qemu-aarch64 entry" >&2; exit 1; }
echo "    qemu-aarch64: $(sed -n 's/^interpreter //p' /proc/sys/fs/binfmt_misc/qemu-aarch64)"

if [[ $FRESH == yes && -d $ROOT ]]; then
    unmount_all
    rm -rf "$ROOT"
fi
step "$(stamp) Debian bookworm arm64 root in $ROOT"
t=$(date +%s)
if [[ -f $ROOT/.fedbell-bootstrapped ]]; then
    echo "    already bootstrapped ($(cat "$ROOT/.fedbell-bootstrapped"))"
    result ok "arm64 root (bootstrapped earlier)" 0
else
    rm -rf "$ROOT"
    nice debootstrap --foreign --arch arm64 --variant=minbase bookworm "$ROOT" "$MIRROR" \
        >"$WORK/debootstrap1.log" 2>&1
    cp /usr/bin/qemu-aarch64-static "$ROOT/usr/bin/"
    nice chroot "$ROOT" /debootstrap/debootstrap --second-stage >"$WORK/debootstrap2.log" 2>&1
    echo "debootstrap bookworm arm64 in $(elapsed "$t") s on $(date -u +%F)" >"$ROOT/.fedbell-bootstrapped"
    result ok "debootstrap --foreign --arch arm64 + second stage under qemu" "$(elapsed "$t")"
fi
in_root uname -m | sed 's/^/    uname -m inside: /'
cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT$HOST_CA"
# No /sys: the host's (x86) sysfs beside qemu's view of the CPU makes cpuinfo,
# inside LiteRT's XNNPACK, crash the interpreter under qemu-user; without it
# cpuinfo falls back to defaults. A Pi has its own /sys.
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"

step "$(stamp) Raspberry Pi OS's camera-side Python packages, as far as Debian has them"
t=$(date +%s)
in_root apt-get update -qq
in_root nice apt-get install -y -qq --no-install-recommends python3 python3-numpy python3-pip >/dev/null
# Raspberry Pi OS's python3-simplejpeg is compiled against apt's numpy 1.24;
# Debian has none, so the PyPI release of that time (1.6.6) stands in for it.
if ! in_root python3 -c "import simplejpeg" 2>/dev/null; then
    in_root nice python3 -m pip install --quiet --break-system-packages --no-deps \
        --target /usr/lib/python3/dist-packages simplejpeg==1.6.6
fi
in_root python3 -c "import numpy, simplejpeg; simplejpeg.encode_jpeg(numpy.zeros((16, 16, 3), numpy.uint8)); print('    system python3: numpy', numpy.__version__, '+ simplejpeg', simplejpeg.__version__, 'work')"
result ok "apt python3-numpy + a simplejpeg built for it (Pi OS stand-in)" "$(elapsed "$t")"

step "$(stamp) The fedbell checkout and a provisioned bundle for $DEVICE"
rm -rf "$ROOT/opt/src/fedbell" "$ROOT/root/bundle" "$WORK/site"
mkdir -p "$ROOT/opt/src/fedbell"
(cd "$SRC" && git ls-files -z | tar --null -T - -c) | tar -x -C "$ROOT/opt/src/fedbell"
"$HOST_PY" -m deploy.provision init --site-dir "$WORK/site" --site picheck \
    --broker-host 127.0.0.1 >/dev/null
"$HOST_PY" -m deploy.provision add-aggregator --site-dir "$WORK/site" --no-reload >/dev/null
"$HOST_PY" -m deploy.provision add-device --site-dir "$WORK/site" --no-reload "$DEVICE" >/dev/null
cp -r "$WORK/site/clients/$DEVICE" "$ROOT/root/bundle"

step "$(stamp) deploy/install-pi.sh --no-systemd --no-camera, inside the arm64 root"
t=$(date +%s)
if in_root nice bash /opt/src/fedbell/deploy/install-pi.sh --bundle /root/bundle \
    --no-systemd --no-camera 2>&1 | tee "$WORK/install-pi.log" | sed 's/^/    | /'; then
    result ok "install-pi.sh (apt, venv, pip: aarch64 wheels only)" "$(elapsed "$t")"
else
    result FAIL "install-pi.sh: see $WORK/install-pi.log" "$(elapsed "$t")"
    printf '%s\n' "${RESULTS[@]}"
    exit 1
fi

step "$(stamp) What the venv holds"
t=$(date +%s)
if in_root /opt/fedbell/venv/bin/python /opt/src/fedbell/deploy/pi_wheels.py; then
    result ok "every compiled package an aarch64 wheel; no TensorFlow" "$(elapsed "$t")"
else
    result FAIL "venv contents (see above)" "$(elapsed "$t")"
fi
t=$(date +%s)
# apt's simplejpeg, seen from the venv's numpy 2: the picamera2 failure the
# venv's own simplejpeg (the `pi` extra) prevents. Shown, then the fix checked.
if in_root /opt/fedbell/venv/bin/python -c "
import sys
import numpy  # the venv's numpy 2, as fedbell imports it first
sys.path.insert(0, '/usr/lib/python3/dist-packages')
import simplejpeg  # apt's, built for numpy 1.24
simplejpeg.encode_jpeg(numpy.zeros((16, 16, 3), numpy.uint8))
" >/dev/null 2>&1; then
    echo "    apt's simplejpeg imports under the venv's numpy too (no conflict to fix here)"
else
    echo "    apt's simplejpeg under the venv's numpy: fails to import (picamera2 issues 1088, 1211)"
fi
if in_root /opt/fedbell/venv/bin/python -c "
import numpy, simplejpeg
jpeg = simplejpeg.encode_jpeg(numpy.zeros((48, 64, 3), numpy.uint8))
assert simplejpeg.decode_jpeg(jpeg).shape == (48, 64, 3)
print('    venv: numpy', numpy.__version__, '+ its own simplejpeg', simplejpeg.__version__,
      'from', simplejpeg.__file__.rsplit('/', 2)[0], ': encode/decode work')
"; then
    result ok "venv numpy 2 + simplejpeg (what picamera2 encodes JPEGs with)" "$(elapsed "$t")"
else
    result FAIL "venv numpy + simplejpeg" "$(elapsed "$t")"
fi

step "$(stamp) The doorbell under emulation against an aggregator on this machine"
t=$(date +%s)
mkdir -p "$SRC/reports"
if nice "$HOST_PY" -m bench.edge --chroot "$ROOT" --doorbell-python /opt/fedbell/venv/bin/python \
    --gallery "$GALLERY" --rounds 8 --secure-rounds 8 --phase-seconds 60 --trainable "$TRAINABLE" \
    --out "$SRC/reports/pi-check.json" \
    2>&1 | tee "$WORK/bench-edge.log" | sed 's/^/    | /'; then
    result ok "enroll, backbone, video, plain and secure rounds (reports/pi-check.json)" \
        "$(elapsed "$t")"
else
    result FAIL "doorbell under emulation: see $WORK/bench-edge.log" "$(elapsed "$t")"
fi

step "pi-check: $(elapsed "$START") s in all"
printf '    %s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'

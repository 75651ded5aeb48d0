#!/usr/bin/env bash
# Install the fedbell broker and aggregator host (Debian / Raspberry Pi OS).
#
#   sudo deploy/install-server.sh --broker-host hub.lan
#
# Creates the site on first run (CA, broker certificate, aggregator and
# operator logins) with `python -m deploy.provision`, installs Mosquitto with
# the production configuration as fedbell-broker.service (replacing the stock
# mosquitto.service) and the aggregator as fedbell-aggregator.service.
# Safe to run again: an existing site is kept as it is.
#
# Options:
#   --site ID           site (federation) id for a new site (default home)
#   --broker-host NAME  name or address doorbells use for the broker
#                       (repeatable; default: this host's names)
#   --site-dir DIR      the site folder (default PREFIX/etc/fedbell/site)
#   --prefix DIR        install under DIR instead of / (a trial run; no users)
#   --venv DIR          virtualenv to create or reuse (default PREFIX/opt/fedbell/venv)
#   --python PATH       interpreter for the venv (default /usr/bin/python3)
#   --no-apt            do not install Debian packages
#   --no-pip            do not pip-install fedbell into the venv
#   --no-systemd        install the unit files but do not enable or start them
# shellcheck source=deploy/lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SITE=home
HOSTS=()
SITE_DIR=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --site) SITE=${2:?--site needs an id}; shift 2 ;;
        --broker-host) HOSTS+=("${2:?--broker-host needs a name}"); shift 2 ;;
        --site-dir) SITE_DIR=${2:?--site-dir needs a folder}; shift 2 ;;
        *) common_option "$@"; shift "$OPTION_WORDS" ;;
    esac
done
set_prefix "$PREFIX"
VENV=${VENV:-$ROOT/opt/fedbell/venv}
SITE_DIR=${SITE_DIR:-$ROOT/etc/fedbell/site}
require_root
if [[ ${#HOSTS[@]} -eq 0 ]]; then
    HOSTS=("$(hostname -f 2>/dev/null || hostname)" "$(hostname)")
fi

step "Debian packages"
if [[ $APT == yes ]]; then
    apt_install mosquitto mosquitto-clients python3 python3-venv python3-pip ca-certificates
else
    note "skipped (--no-apt)"
fi
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd missing: apt-get install mosquitto"

step "Service user"
if real_install; then
    ensure_service_user
    getent passwd mosquitto >/dev/null || die "no mosquitto user: is the mosquitto package installed?"
else
    note "skipped for a --prefix install"
fi

step "Python environment in $VENV (fedbell with training)"
make_venv "$PYTHON" "$VENV" no "$PIP" "train"

# The provisioner runs from this checkout (deploy/ is not part of the wheel).
provision() { run env PYTHONPATH="$FEDBELL_SRC" "$VENV/bin/python" -m deploy.provision "$@" \
    --site-dir "$SITE_DIR"; }
has_login() {
    local logins
    logins=$(env PYTHONPATH="$FEDBELL_SRC" "$VENV/bin/python" -m deploy.provision list \
        --site-dir "$SITE_DIR")
    awk -v name="$1" '$2 == name { found = 1 } END { exit !found }' <<<"$logins"
}

step "Site in $SITE_DIR"
if [[ -f $SITE_DIR/site.json ]]; then
    note "site exists: kept as it is"
else
    host_args=()
    for host in "${HOSTS[@]}"; do host_args+=(--broker-host "$host"); done
    provision init --site "$SITE" "${host_args[@]}" \
        --broker-data-dir "$ROOT/var/lib/fedbell-broker"
fi
if has_login aggregator; then
    note "aggregator login exists"
else
    provision add-aggregator --no-reload
fi
if has_login operator; then
    note "operator login exists"
else
    provision add-operator --no-reload
fi
if ! real_install; then
    # systemd's StateDirectory= makes it on a real install.
    run install -d -m 0700 "$ROOT/var/lib/fedbell-broker"
fi

step "Aggregator configuration and credentials"
bundle=$SITE_DIR/clients/aggregator
install_config "$bundle/aggregator.yaml" "$ROOT/etc/fedbell/aggregator.yaml"
install_credentials "$bundle" aggregator ca.crt client.crt client.key mqtt-password signing.key

step "systemd units"
for unit in fedbell-broker.service fedbell-aggregator.service; do
    install_text "$FEDBELL_SRC/systemd/$unit" "$ROOT/etc/systemd/system/$unit" 0644
done

step "Starting the broker and the aggregator"
if [[ $SYSTEMD == no ]]; then
    note "skipped (--no-systemd); to start:"
    note "systemctl disable --now mosquitto; systemctl enable --now fedbell-broker fedbell-aggregator"
elif ! systemd_running; then
    die "systemd is not running here: use --no-systemd"
else
    run systemctl daemon-reload
    # The stock unit runs an anonymous broker on 1883: not on a fedbell host.
    if systemctl list-unit-files mosquitto.service >/dev/null 2>&1; then
        run systemctl disable --now mosquitto.service
    fi
    run systemctl enable fedbell-broker.service fedbell-aggregator.service
    run systemctl restart fedbell-broker.service
    run systemctl restart fedbell-aggregator.service
    run systemctl --no-pager --lines=5 status fedbell-broker.service fedbell-aggregator.service \
        || true
fi

step "Done: broker and aggregator installed"
note "add a doorbell:  (cd $FEDBELL_SRC && sudo $VENV/bin/python -m deploy.provision add-device door1 --site-dir $SITE_DIR)"
note "then copy $SITE_DIR/clients/door1 to the Pi and run deploy/install-pi.sh --bundle <copy> there"
note "operator login:  $SITE_DIR/clients/operator (mosquitto_pub --cafile/--cert/--key, -u operator)"

#!/usr/bin/env bash
# Install what the tests and the simulation need beside Python: the Mosquitto
# broker (always), nats-server (the federation tier's cluster: broker/cluster.py,
# its tests skip without it), shellcheck and systemd-analyze (for the deployment tests),
# Debian's chromium (the console's browser test drives it with Playwright, which
# must not download a browser of its own).
# Tests and the simulation start their own broker on a free loopback port;
# they never use a running one.
set -euo pipefail
missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto mosquitto-clients)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fedbell: installing ${missing[*]} with apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    exit 0
fi
if [[ " ${missing[*]} " == *" mosquitto "* ]]; then
    echo "fedbell: Mosquitto is not installed. Install it with:" >&2
    echo "    sudo apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "fedbell: optional tools missing (their tests will skip): ${missing[*]}" >&2
echo "    sudo apt-get install ${missing[*]}" >&2

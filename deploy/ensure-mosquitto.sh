#!/usr/bin/env bash
# Make sure the Mosquitto broker binary is installed (tests and the simulation
# start their own broker on a free loopback port; they never use a running one).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "fedbell: installing Mosquitto (Debian package 'mosquitto')"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients
    exit 0
fi
echo "fedbell: Mosquitto is not installed. Install it with:" >&2
echo "    sudo apt-get install mosquitto mosquitto-clients" >&2
exit 1

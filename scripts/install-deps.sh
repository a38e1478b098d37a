#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian bookworm machine: QEMU 10.0 from
# bookworm-backports (the peer of every interop test), and the Python packages the
# end-to-end tests use. Safe to run again.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

qemu_version() {
  qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9.]*\).*/\1/p'
}

if [ "$(qemu_version)" != "10.0.2" ]; then
  src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ]; then
    if ! grep -q '^Suites:.*bookworm-backports' "$src"; then
      $SUDO sed -i '0,/^Suites: bookworm\b/s/^\(Suites: bookworm\b.*\)$/\1 bookworm-backports/' "$src"
    fi
  elif [ -f /etc/apt/sources.list ] && ! grep -q 'bookworm-backports' /etc/apt/sources.list; then
    line=$(grep -m1 '^deb .* bookworm main' /etc/apt/sources.list)
    echo "${line/ bookworm / bookworm-backports }" | $SUDO tee -a /etc/apt/sources.list >/dev/null
  fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q -t bookworm-backports qemu-system-x86 zlib1g-dev libzstd-dev pkg-config
fi
echo "QEMU: $(qemu_version)"

# The build needs none of these: zstd is compiled from source, and zlib too when the
# system has no headers. With them, zlib is the system's (the library QEMU uses) and
# the engine's `system-zstd` feature can link the system's libzstd. openssl makes the
# TLS tests' certificates.
if ! dpkg -s zlib1g-dev libzstd-dev pkg-config openssl >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q zlib1g-dev libzstd-dev pkg-config openssl
fi

python3 -m pip install -q --disable-pip-version-check qemu.qmp pytest zstandard

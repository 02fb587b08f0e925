#!/usr/bin/env bash
# Runs every ipop test: formatting and lints, unit tests, simulation tests of the core, and the
# end-to-end tests that start real daemons in network namespaces with real TUN devices and a
# real XMPP server (Prosody or ejabberd, started by the tests themselves).
# Run as root on Debian; missing Debian packages are installed first.
set -euo pipefail

[[ $EUID -eq 0 ]] || { echo "test: run as root (end-to-end tests create network namespaces and TUN devices)" >&2; exit 1; }
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '==> %s\n' "$*" >&2; }

step "checking Debian packages"
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v prosodyctl >/dev/null || need+=(prosody)
command -v ejabberdctl >/dev/null || need+=(ejabberd)
command -v nft >/dev/null || need+=(nftables)
command -v turnserver >/dev/null || need+=(coturn)
command -v conntrack >/dev/null || need+=(conntrack)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v adduser >/dev/null || need+=(adduser)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v miniupnpd >/dev/null || need+=(miniupnpd-nftables)
command -v natpmpc >/dev/null || need+=(natpmpc)
command -v upnpc >/dev/null || need+=(miniupnpc)
if ((${#need[@]})); then
  step "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[[ -c /dev/net/tun ]] || { echo "test: /dev/net/tun is missing: the kernel has no TUN support here" >&2; exit 1; }
# The Debian package's test builds the package with cargo-deb (about a minute to install).
if ! command -v cargo-deb >/dev/null; then
  step "installing cargo-deb"
  cargo install --quiet --locked cargo-deb@3.8.0
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
step "cargo test"
cargo test --workspace

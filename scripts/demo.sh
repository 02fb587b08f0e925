#!/usr/bin/env bash
# ipop demo: the scenario of IPOP's XMPP/OSN bindings on one machine. Alice and Bob are friends
# on an XMPP server; Carol creates a group and adds David. Each user's device sits behind its own
# NAT router on a fake internet (network namespaces), where a server runs Prosody and coturn.
# Every device runs `ipop up` with only its XMPP account and overlay configured; the demo shows
# `ipop status` on each, and pings by DNS name across a direct and a relayed link.
#
# Usage: sudo scripts/demo.sh [--stay]    (or as root: scripts/demo.sh)
#   --stay   stay up afterwards, print how to explore; Ctrl-C removes everything
#
# It installs the Debian packages it needs when they are missing, builds ipop (release) and the
# demo driver (crates/ipop-lab/examples/seed_demo.rs), and removes everything it created when it
# ends, also on failure or Ctrl-C. Nothing leaves the machine.
set -euo pipefail

usage() { sed -n '8,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
stay=()
case "${1:-}" in
  "") ;;
  --stay) stay=(--stay) ;;
  -h | --help) usage; exit 0 ;;
  *) usage >&2; exit 2 ;;
esac
[[ $EUID -eq 0 ]] || { echo "demo: run as root: sudo $0 $*" >&2; exit 1; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Steps in all: 2 here, the rest in the driver (it checks the number).
total=13
started=$(date +%s.%N)
log=$(mktemp)
trap 'rm -f "$log"' EXIT

begin() { printf '[%d/%d] %s … ' "$1" "$total" "$2"; step_start=$(date +%s.%N); }
took() {
  awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { s = b - a;
    if (s < 60) printf "%.1f s", s; else printf "%d min %d s", s / 60, s % 60 }'
}
ok() { printf 'ok (%s)\n' "$(took "$step_start")"; }
failed() { printf 'FAILED (%s)\n' "$(took "$step_start")"; printf '%s\n' "$1" | sed 's/^/    /'; exit 1; }

# Under sudo, build as the user who ran it, with their Rust toolchain: target/ stays theirs.
as_user=()
if [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]]; then
  home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
  as_user=(runuser -u "$SUDO_USER" -- env HOME="$home" PATH="$home/.cargo/bin:$PATH")
fi
need_rust=$(sed -n 's/^rust-version *= *"\(.*\)"/\1/p' "$root/Cargo.toml")
have_rust=$("${as_user[@]}" cargo --version 2>/dev/null | awk '{ print $2 }') || have_rust=
if [[ -z "$have_rust" || $(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -n1) != "$need_rust" ]]; then
  cat >&2 <<MSG
demo: ipop needs Rust $need_rust or newer (cargo), found: ${have_rust:-none}.
Install it with rustup, as the user who runs the demo (see https://rustup.rs):
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
or update an existing one: rustup update stable
Then run sudo $0 again.
MSG
  exit 1
fi

begin 1 "installing the missing Debian packages (prosody coturn nftables iproute2 iputils-ping)"
need=()
for pkg in prosody coturn nftables iproute2 iputils-ping; do
  dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q ' installed$' || need+=("$pkg")
done
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
    failed "$(tail -n 20 "$log")"
  fi
  printf '(installed %s) ' "${need[*]}"
fi
[[ -c /dev/net/tun ]] || failed "/dev/net/tun is missing: the kernel has no TUN support here"
ok

target=${CARGO_TARGET_DIR:-$root/target}
begin 2 "building ipop and the demo driver (release; the first build takes minutes)"
if ! { "${as_user[@]}" cargo build --release --manifest-path "$root/Cargo.toml" -p ipop &&
  "${as_user[@]}" cargo build --release --manifest-path "$root/Cargo.toml" -p ipop-lab --example seed_demo; } >"$log" 2>&1; then
  errors=$(grep -E -A8 '^error' "$log" | head -n 40)
  failed "${errors:-$(tail -n 20 "$log")}"
fi
ok

# The driver runs in a session of its own, so that Ctrl-C reaches it alone (forwarded below),
# not the servers and daemons it started: they keep running until it stops them in order.
setsid "$target/release/examples/seed_demo" --ipop "$target/release/ipop" \
  --first-step 3 --total "$total" "${stay[@]}" &
driver=$!
trap 'kill -INT "$driver" 2>/dev/null' INT TERM HUP
status=
while [[ -z "$status" ]]; do
  if wait "$driver"; then
    status=0
  else
    code=$?
    # A trapped signal ends `wait` early; the driver's own status comes once it has exited.
    kill -0 "$driver" 2>/dev/null || status=$code
  fi
done
printf 'The demo took %s in all.\n' "$(took "$started")"
exit "$status"

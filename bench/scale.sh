#!/usr/bin/env bash
# bench/scale.sh N [prosody|ejabberd] - the scale benchmark (issue "Scale", item 1).
#
# N devices in one members-only group room, and one more device whose user has the N users as
# friends (mutual subscription), each device in its own network namespace with its own
# `ipop up`, on one LAN with one XMPP server (Prosody by default, or ejabberd) that has its
# stock client rate limits: Debian's Prosody c2s limit of 10 kB/s, ejabberd's `normal` shaper
# of 3000 B/s with bursts of 20 000 B. N + 3 namespaces in all (the devices, the server and
# the LAN's switch).
#
# It prints a table of: the time from starting every daemon to every wanted pair passing a
# ping (every pair of group members, and the well-connected device with each friend), the XMPP
# stanzas and bytes per device and per link, link offers and failed signals, and, once every
# pair passes, each daemon's idle CPU and memory. The logic is in crates/ipop-lab/src/scale.rs
# (the `ipop-scale` binary); this script builds the release binaries when they are missing or
# older than the sources, and runs it.
#
# Must run as root. Everything it creates (namespaces, processes, temporary directories) is
# removed on exit, including on error and Ctrl-C; traffic stays in the namespaces it creates.
#
# Environment:
#   SCALE_TIMEOUT        seconds for every pair to pass, from starting the daemons (default 600)
#   SCALE_IDLE_SECONDS   seconds of idle CPU measurement once they pass              (default 30)
#   SCALE_PING_WORKERS   pings run at once                                            (default 8)
#   SCALE_JSON           also write the report as JSON to this file
#   SCALE_LOGS           copy the logs of the daemons and the server to this directory
#   IPOP_BIN, IPOP_SCALE_BIN  binaries to use; if unset, target/release/ipop and
#                        target/release/ipop-scale, (re)built with `cargo build --release`
#                        when missing or older than the sources

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage="usage: bench/scale.sh N [prosody|ejabberd]"
[[ $# -ge 1 && $# -le 2 ]] || die "$usage"
N=$1
SERVER=${2:-prosody}
[[ "$N" =~ ^[0-9]+$ ]] && ((N >= 2 && N <= 200)) || die "N must be 2 to 200; $usage"
[[ "$SERVER" == prosody || "$SERVER" == ejabberd ]] || die "unknown server $SERVER; $usage"
[[ $EUID -eq 0 ]] || die "must run as root (namespaces, TUN devices)"

ensure_packages() {
	local -a missing=()
	command -v ip >/dev/null || missing+=(iproute2)
	command -v ping >/dev/null || missing+=(iputils-ping)
	if [[ "$SERVER" == prosody ]]; then
		command -v prosody >/dev/null || missing+=(prosody)
	else
		command -v ejabberdctl >/dev/null || missing+=(ejabberd)
	fi
	((${#missing[@]} == 0)) && return 0
	log "installing Debian packages: ${missing[*]}"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2; then
		apt-get update -q >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
	fi
}

# stale BIN: prints why BIN must be (re)built, or nothing.
stale() {
	if [[ ! -x "$1" ]]; then
		echo "missing"
		return 0
	fi
	find "$REPO/crates" "$REPO/Cargo.toml" "$REPO/Cargo.lock" -newer "$1" \
		\( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -print -quit 2>/dev/null || true
}

ensure_binaries() {
	local why=""
	if [[ -z "${IPOP_BIN:-}" ]]; then
		IPOP_BIN="$REPO/target/release/ipop"
		why+=$(stale "$IPOP_BIN")
	fi
	if [[ -z "${IPOP_SCALE_BIN:-}" ]]; then
		IPOP_SCALE_BIN="$REPO/target/release/ipop-scale"
		why+=$(stale "$IPOP_SCALE_BIN")
	fi
	if [[ -n "$why" ]]; then
		log "building ipop and ipop-scale (release): ${why/#$REPO\//newer source: }"
		(cd "$REPO" && cargo build --release -p ipop --bin ipop -p ipop-lab --bin ipop-scale >&2) ||
			die "cargo build --release failed; set IPOP_BIN and IPOP_SCALE_BIN to use existing binaries"
	fi
	[[ -x "$IPOP_BIN" ]] || die "$IPOP_BIN is not executable"
	[[ -x "$IPOP_SCALE_BIN" ]] || die "$IPOP_SCALE_BIN is not executable"
	log "ipop: $IPOP_BIN; ipop-scale: $IPOP_SCALE_BIN"
}

ensure_packages
ensure_binaries
export IPOP_BIN
# ipop-scale removes what it creates itself, also on Ctrl-C: it replaces this shell.
exec "$IPOP_SCALE_BIN" "$N" "$SERVER"

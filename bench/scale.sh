#!/usr/bin/env bash
# bench/scale.sh N [prosody|ejabberd] [all|on-demand|auto] - the scale benchmark.
#
# N devices in one members-only group room, and one more device whose user has the N users as
# friends (mutual subscription), each device in its own network namespace with its own
# `ipop up`, on one LAN with one XMPP server (Prosody by default, or ejabberd) that has its
# stock client rate limits: Debian's Prosody c2s limit of 10 kB/s, ejabberd's `normal` shaper
# of 3000 B/s with bursts of 20 000 B. N + 3 namespaces in all (the devices, the server and
# the LAN's switch). Every device has the given link policy (`links`, default auto) in the
# group and in its social overlay.
#
# It prints a table of: the time from starting every daemon to every wanted pair passing a
# ping (every pair of group members, and the well-connected device with each friend; a ping to
# a device linked on demand opens its link), the on-demand set-up time, the links up, the XMPP
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
#   SCALE_REST_SECONDS   an idle_timeout for the links; the run waits for them to close before
#                        the final figures (default: links stay up to the end)
#   SCALE_SEND_RATE      every device's [xmpp] send_rate, bytes/s, 0 for no pacing (default: ipop's)
#   SCALE_PING_WORKERS   pings run at once                                            (default 16)
#   SCALE_JSON           also write the report as JSON to this file
#   SCALE_LOGS           copy the logs of the daemons and the server to this directory
#   IPOP_BIN, IPOP_SCALE_BIN  binaries to use; if unset, target/release/ipop and
#                        target/release/ipop-scale, (re)built with `cargo build --release`
#                        when missing or older than the sources

set -euo pipefail

BENCH_NAME=scale
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage="usage: bench/scale.sh N [prosody|ejabberd] [all|on-demand|auto]"
[[ $# -ge 1 && $# -le 3 ]] || die "$usage"
N=$1
SERVER=${2:-prosody}
LINKS=${3:-auto}
if ! [[ "$N" =~ ^[0-9]+$ ]] || ((N < 2 || N > 200)); then die "N must be 2 to 200; $usage"; fi
[[ "$SERVER" == prosody || "$SERVER" == ejabberd ]] || die "unknown server $SERVER; $usage"
[[ "$LINKS" == all || "$LINKS" == on-demand || "$LINKS" == auto ]] ||
	die "unknown link policy $LINKS; $usage"
[[ $EUID -eq 0 ]] || die "must run as root (namespaces, TUN devices)"

if [[ "$SERVER" == prosody ]]; then
	ensure_packages --with-recommends ip:iproute2 ping:iputils-ping prosody:prosody
else
	ensure_packages --with-recommends ip:iproute2 ping:iputils-ping ejabberdctl:ejabberd
fi
ensure_release_binaries ipop:ipop ipop-lab:ipop-scale
export IPOP_BIN
# ipop-scale removes what it creates itself, also on Ctrl-C: it replaces this shell.
exec "$IPOP_SCALE_BIN" "$N" "$SERVER" "$LINKS"

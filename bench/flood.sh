#!/usr/bin/env bash
# bench/flood.sh - ipop's throughput under a handshake flood.
#
# Two namespaces joined by one veth pair (MTU 1500), an ipop daemon in each,
# linked as static peers. iperf3 (single TCP stream) from A to B's overlay
# address, first unloaded, then while ipop-flood sends forged WireGuard
# handshake initiations at B's port from several extra addresses of A's veth
# (half random bytes, half with a valid MAC1 for B's key, which pass the MAC1
# check and must take the cookie path). Runs alternate unloaded and loaded, so
# that other load on the machine hits both alike; each figure is the median.
# Prints both throughputs and their ratio (target: at least 0.70), what the
# flood achieved, B's drop counters and B's CPU time per run.
#
# Must run as root. Everything it creates (namespaces, processes, temp files)
# is removed on exit, including on error and Ctrl-C.
#
# Environment:
#   BENCH_DURATION    seconds per iperf3 run                        (default 10)
#   BENCH_RUNS        runs of each kind, median taken               (default 3)
#   FLOOD_RATE        forged initiations per second                 (default 20000)
#   FLOOD_SOURCES     source addresses the flood comes from         (default 5)
#   FLOOD_FORGERY     random, mac1 or both                          (default both)
#   IPOP_BIN, IPOP_FLOOD_BIN
#                     binaries to use; if unset, target/release/ipop and
#                     target/release/ipop-flood are used and (re)built with
#                     cargo when missing or older than the sources
#   BENCH_UP_TIMEOUT  seconds to wait for the link to come up       (default 30)

set -euo pipefail

DURATION=${BENCH_DURATION:-10}
RUNS=${BENCH_RUNS:-3}
RATE=${FLOOD_RATE:-20000}
SOURCES=${FLOOD_SOURCES:-5}
FORGERY=${FLOOD_FORGERY:-both}
UP_TIMEOUT=${BENCH_UP_TIMEOUT:-30}
TUN_MTU=1420
UNDERLAY_MTU=1500
TARGET_RATIO=0.70

BENCH_NAME=flood
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TAG="$$$(printf '%04x' $((RANDOM % 65536)))"
NS_A="ipopflood-a-$TAG"
NS_B="ipopflood-b-$TAG"
VETH_A="vf$TAG"a
VETH_B="vf$TAG"b
UNDER_A=10.231.0.1
UNDER_B=10.231.0.2
FLOOD_NET=10.231.0  # sources are .101, .102, ...
IPOP_ADDR_A=10.77.0.1
IPOP_ADDR_B=10.77.0.2
IPOP_PORT=51821

WORKDIR=""
PIDS=()
FLOOD_PID=""
IPERF_SRV_PID=""
NS_CREATED=()

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if ((rc != 0)) && [[ -n "$WORKDIR" && -d "$WORKDIR" ]]; then
		local f
		for f in "$WORKDIR"/*.log; do
			[[ -s "$f" ]] || continue
			log "--- last lines of $(basename "$f") ---"
			tail -n 20 "$f" >&2
		done
	fi
	log "cleaning up"
	stop_pids "$FG_PID" "$FLOOD_PID" "$IPERF_SRV_PID" "${PIDS[@]}"
	local ns pid
	for ns in "${NS_CREATED[@]}"; do
		# Anything still running inside our namespaces was started by us.
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			log "killing leftover pid $pid in $ns"
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
	done
	[[ -n "$WORKDIR" ]] && rm -rf "$WORKDIR"
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

# ---------------------------------------------------------------- prerequisites

# ---------------------------------------------------------------- network and daemons

setup_lan() {
	log "creating namespaces $NS_A, $NS_B and veth pair (MTU $UNDERLAY_MTU)"
	ip netns add "$NS_A"
	NS_CREATED+=("$NS_A")
	ip netns add "$NS_B"
	NS_CREATED+=("$NS_B")
	ip link add "$VETH_A" mtu "$UNDERLAY_MTU" netns "$NS_A" type veth \
		peer name "$VETH_B" mtu "$UNDERLAY_MTU" netns "$NS_B"
	in_a ip link set lo up
	in_b ip link set lo up
	in_a ip addr add "$UNDER_A/24" dev "$VETH_A"
	in_b ip addr add "$UNDER_B/24" dev "$VETH_B"
	local i
	FLOOD_FROM=""
	for ((i = 1; i <= SOURCES; i++)); do
		in_a ip addr add "$FLOOD_NET.$((100 + i))/24" dev "$VETH_A"
		FLOOD_FROM+="${FLOOD_FROM:+,}$FLOOD_NET.$((100 + i))"
	done
	in_a ip link set "$VETH_A" up
	in_b ip link set "$VETH_B" up
	wait_ping "$UNDER_B" "underlay"
}

wait_ping() {
	local addr=$1 what=$2 i
	for ((i = 0; i < UP_TIMEOUT; i++)); do
		if in_a ping -c 1 -W 1 -q "$addr" >/dev/null 2>&1; then
			return 0
		fi
		sleep 1
	done
	die "$what: $addr not reachable from $NS_A after ${UP_TIMEOUT}s"
}

# write_config DIR OWN_ADDR PEER_PUBKEY PEER_UNDERLAY PEER_ADDR
write_config() {
	cat >"$1/ipop.toml" <<EOF
[device]
private_key_file = "ipop.key"
log_level = "warn"
control_socket = "$1/ipop.sock"

[interface]
name = "ipop0"
addresses = ["$2/24"]
mtu = $TUN_MTU
listen_port = $IPOP_PORT

[[peers]]
public_key = "$3"
endpoint = "$4:$IPOP_PORT"
addresses = ["$5/32"]
EOF
}

ipop_status() {
	timeout -k 2 5 ip netns exec "$1" "$IPOP_BIN" status --json -c "$2"
}

ipop_connected() {
	local out
	out=$(ipop_status "$1" "$2" 2>/dev/null) || return 1
	jq -e '(.overlays[0].peers | length) > 0 and all(.overlays[0].peers[]; .state == "connected")' \
		>/dev/null 2>&1 <<<"$out"
}

PUB_B=""
PID_B=""
start_ipop() {
	local da="$WORKDIR/ipop-a" db="$WORKDIR/ipop-b" pub_a pid_a
	mkdir -p "$da" "$db"
	"$IPOP_BIN" init --static "$da/ipop.toml" >/dev/null
	"$IPOP_BIN" init --static "$db/ipop.toml" >/dev/null
	pub_a=$("$IPOP_BIN" key -c "$da/ipop.toml" | awk 'NR == 1')
	PUB_B=$("$IPOP_BIN" key -c "$db/ipop.toml" | awk 'NR == 1')
	[[ -n "$pub_a" && -n "$PUB_B" ]] || die "ipop key printed no public key"
	write_config "$da" "$IPOP_ADDR_A" "$PUB_B" "$UNDER_B" "$IPOP_ADDR_B"
	write_config "$db" "$IPOP_ADDR_B" "$pub_a" "$UNDER_A" "$IPOP_ADDR_A"
	ip netns exec "$NS_A" "$IPOP_BIN" up -c "$da/ipop.toml" >"$WORKDIR/ipop-a.log" 2>&1 &
	pid_a=$!
	PIDS+=("$pid_a")
	ip netns exec "$NS_B" "$IPOP_BIN" up -c "$db/ipop.toml" >"$WORKDIR/ipop-b.log" 2>&1 &
	PID_B=$!
	PIDS+=("$PID_B")
	local i
	for ((i = 0; i < UP_TIMEOUT * 2; i++)); do
		is_alive "$pid_a" || die "ipop in $NS_A exited (see ipop-a.log)"
		is_alive "$PID_B" || die "ipop in $NS_B exited (see ipop-b.log)"
		if ipop_connected "$NS_A" "$da/ipop.toml" && ipop_connected "$NS_B" "$db/ipop.toml"; then
			log "ipop: peers connected"
			return 0
		fi
		sleep 0.5
	done
	die "ipop peers not connected after ${UP_TIMEOUT}s"
}

start_iperf_server() {
	is_alive "$IPERF_SRV_PID" && return 0
	ip netns exec "$NS_B" iperf3 -s >"$WORKDIR/iperf3-server.log" 2>&1 &
	IPERF_SRV_PID=$!
	local i
	for ((i = 0; i < 50; i++)); do
		in_b ss -Hltn 'sport = :5201' | grep -q . && return 0
		is_alive "$IPERF_SRV_PID" || die "iperf3 server exited at start"
		sleep 0.1
	done
	die "iperf3 server not listening on :5201 after 5 s"
}

# ---------------------------------------------------------------- measurements

# cpu_ticks PID: user+system clock ticks the process used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

IPERF_MBPS=""
iperf_once() {
	local out="$WORKDIR/iperf3-client.json"
	IPERF_MBPS=""
	start_iperf_server
	fg_run "$out" "$WORKDIR/iperf3-client.log" timeout -k 5 $((DURATION + 30)) ip netns exec "$NS_A" \
		iperf3 -c "$IPOP_ADDR_B" -t "$DURATION" -P 1 --connect-timeout 5000 -J ||
		{ log "iperf3 failed: $(jq -r '.error // empty' "$out" 2>/dev/null)"; return 1; }
	IPERF_MBPS=$(jq -e -r '.end.sum_received.bits_per_second / 1e6' "$out") ||
		{ log "no throughput in iperf3 output: $(jq -r '.error // empty' "$out" 2>/dev/null)"; return 1; }
}

start_flood() {
	# Runs one second before and after the iperf3 run; bounded by --seconds.
	ip netns exec "$NS_A" "$IPOP_FLOOD_BIN" --to "$UNDER_B:$IPOP_PORT" --key "$PUB_B" \
		--from "$FLOOD_FROM" --rate "$RATE" --seconds $((DURATION + 2)) --forgery "$FORGERY" \
		>"$WORKDIR/flood.json" 2>"$WORKDIR/flood.log" &
	FLOOD_PID=$!
	sleep 1
	is_alive "$FLOOD_PID" || die "ipop-flood exited at start: $(cat "$WORKDIR/flood.log")"
}

median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "nan"; exit }
		if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

declare -a UNLOADED=() LOADED=() FLOOD_RATES=() COOKIES=() CPU_UNLOADED=() CPU_LOADED=()

measure() {
	local run t0 t1 hz
	hz=$(getconf CLK_TCK)
	for ((run = 1; run <= RUNS; run++)); do
		t0=$(cpu_ticks "$PID_B")
		iperf_once || die "unloaded run $run failed"
		t1=$(cpu_ticks "$PID_B")
		UNLOADED+=("$IPERF_MBPS")
		CPU_UNLOADED+=("$(awk -v t=$((t1 - t0)) -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.0f", 100 * t / hz / d }')")
		log "run $run/$RUNS unloaded: $(printf '%.1f' "$IPERF_MBPS") Mbit/s, B at ${CPU_UNLOADED[-1]} % CPU"

		start_flood
		t0=$(cpu_ticks "$PID_B")
		# A flood that breaks the transfer leaves no throughput: counted as 0.
		iperf_once || { log "flooded run $run failed: counted as 0 Mbit/s"; IPERF_MBPS=0; }
		t1=$(cpu_ticks "$PID_B")
		wait "$FLOOD_PID" || die "ipop-flood failed: $(cat "$WORKDIR/flood.log")"
		FLOOD_PID=""
		LOADED+=("$IPERF_MBPS")
		CPU_LOADED+=("$(awk -v t=$((t1 - t0)) -v hz="$hz" -v d="$DURATION" 'BEGIN { printf "%.0f", 100 * t / hz / d }')")
		FLOOD_RATES+=("$(jq -r '.rate' "$WORKDIR/flood.json")")
		COOKIES+=("$(jq -r '.cookie_replies' "$WORKDIR/flood.json")")
		log "run $run/$RUNS flooded: $(printf '%.1f' "$IPERF_MBPS") Mbit/s, B at ${CPU_LOADED[-1]} % CPU; flood $(jq -c . "$WORKDIR/flood.json")"
	done
}

report() {
	local u l ratio verdict drops
	u=$(median "${UNLOADED[@]}")
	l=$(median "${LOADED[@]}")
	ratio=$(awk -v a="$l" -v b="$u" 'BEGIN { if (b == 0) print "nan"; else printf "%.3f", a / b }')
	verdict=$(awk -v r="$ratio" -v t="$TARGET_RATIO" 'BEGIN { print (r >= t) ? "meets" : "below" }')
	drops=$(ipop_status "$NS_B" "$WORKDIR/ipop-b/ipop.toml" 2>/dev/null |
		jq -c '.drops // {} | with_entries(select(.value != 0))' || echo '?')
	printf '\nipop under a handshake flood  (%s; kernel %s; %s CPUs; iperf3 -P 1, %ss x %s runs, median; tunnel MTU %s)\n' \
		"$(date '+%Y-%m-%d %H:%M:%S')" "$(uname -r)" "$(nproc)" "$DURATION" "$RUNS" "$TUN_MTU"
	printf 'load average at start: %s; at end: %s  (other load on the machine makes single runs noisy)\n' \
		"$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
	printf 'flood: %s forged initiations/s asked (%s), from %s addresses; achieved %s/s (median); cookie replies per run: %s\n\n' \
		"$RATE" "$FORGERY" "$SOURCES" "$(printf '%.0f' "$(median "${FLOOD_RATES[@]}")")" "${COOKIES[*]}"
	printf '%-22s %16s %22s\n' "" "1-stream Mbit/s" "receiver (B) CPU %"
	printf '%-22s %16.1f %22s\n' "unloaded" "$u" "${CPU_UNLOADED[*]}"
	printf '%-22s %16.1f %22s\n' "under the flood" "$l" "${CPU_LOADED[*]}"
	printf '%-22s %16s\n' "ratio" "$ratio ($verdict the $TARGET_RATIO target)"
	printf '\nsamples unloaded: %s\nsamples flooded:  %s\n' "${UNLOADED[*]}" "${LOADED[*]}"
	printf "B's drop counters (ipop status, non-zero only): %s\n" "$drops"
}

main() {
	[[ $EUID -eq 0 ]] || die "must run as root (creates network namespaces)"
	[[ "$DURATION" =~ ^[0-9]+$ && "$DURATION" -gt 0 ]] || die "BENCH_DURATION must be a positive integer"
	[[ "$RUNS" =~ ^[0-9]+$ && "$RUNS" -gt 0 ]] || die "BENCH_RUNS must be a positive integer"
	[[ "$RATE" =~ ^[0-9]+$ && "$RATE" -gt 0 ]] || die "FLOOD_RATE must be a positive integer"
	[[ "$SOURCES" =~ ^[0-9]+$ && "$SOURCES" -ge 1 && "$SOURCES" -le 50 ]] || die "FLOOD_SOURCES must be 1 to 50"
	case $FORGERY in random | mac1 | both) ;; *) die "FLOOD_FORGERY must be random, mac1 or both" ;; esac
	ensure_packages iperf3:iperf3 ip:iproute2 ping:iputils-ping jq:jq timeout:coreutils
	ensure_release_binaries ipop:ipop ipop-lab:ipop-flood
	WORKDIR=$(mktemp -d /tmp/ipop-flood.XXXXXX)
	chmod 700 "$WORKDIR"
	umask 077
	LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
	setup_lan
	start_ipop
	measure
	report
}

main "$@"

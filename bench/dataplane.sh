#!/usr/bin/env bash
# bench/dataplane.sh - data-plane benchmark: raw veth vs boringtun-cli vs ipop.
#
# Builds a two-namespace LAN (two fresh netns joined by one veth pair, MTU
# 1500), then for each configuration measures TCP throughput with iperf3
# (1 stream and 4 streams, median of BENCH_RUNS runs) and idle ping RTT, and
# prints a table with ipop's ratios to the other two. For the two tunnels it
# also reports, over the iperf3 runs: the CPU each daemon used (utime+stime
# from /proc/PID/stat, % of one core) and the receiver's TUN writes per
# WireGuard datagram received (TUN rx packets over veth datagrams). For ipop:
# the RTT it adds over raw veth, its peak RSS (VmHWM) and its instructions per
# transferred MB: `perf stat -e instructions` over the iperf3 runs where the
# CPU exposes that counter, and otherwise (as in VMs without a PMU) a separate
# pass with both daemons under `valgrind --tool=callgrind`, counting user-space
# instructions only, over a transfer of BENCH_CALLGRIND_MB megabytes.
#
# Must run as root. Everything it creates (namespaces, processes, temp files)
# is removed on exit, including on error and Ctrl-C.
#
# Environment:
#   BENCH_DURATION   seconds per iperf3 run                   (default 10)
#   BENCH_RUNS       iperf3 runs per measurement, median taken (default 3)
#   BENCH_PING_COUNT pings per RTT measurement, 0.2 s apart    (default 20);
#                    a second measurement sends 500 pings 2 ms apart
#   BENCH_CONFIGS    which configurations to run               (default "raw boringtun ipop")
#   IPOP_BIN         ipop binary to use; if unset, target/release/ipop is used
#                    and (re)built with `cargo build --release -p ipop` when it
#                    is missing or older than the sources
#   BORINGTUN_BIN    boringtun-cli binary (default: from PATH or ~/.cargo/bin;
#                    installed with `cargo install --locked boringtun-cli@0.7.1`
#                    if missing)
#   BORINGTUN_THREADS  boringtun-cli --threads                 (default: its own default, 4)
#   BENCH_UP_TIMEOUT seconds to wait for a tunnel to come up   (default 30)
#   BENCH_CALLGRIND_MB megabytes moved under callgrind when perf has no
#                    instruction counter; 0 skips that pass      (default 50)
#   BENCH_PIN        1 pins each end to its own CPU (namespace A's daemon, iperf3
#                    client and ping to CPU 0, B's daemon and iperf3 server to
#                    CPU 1), for every configuration alike: the two ends then
#                    share no core, as on two machines    (default 0: the
#                    scheduler places everything)
#   BENCH_IDLE_PEERS N > 0 measures ipop again with N idle static peers in both
#                    daemons (see run_idle_peers) and reports both side by side (default 0)

set -euo pipefail

DURATION=${BENCH_DURATION:-10}
RUNS=${BENCH_RUNS:-3}
PING_COUNT=${BENCH_PING_COUNT:-20}
WARM_PING_COUNT=500
CONFIGS=${BENCH_CONFIGS:-raw boringtun ipop}
UP_TIMEOUT=${BENCH_UP_TIMEOUT:-30}
CALLGRIND_MB=${BENCH_CALLGRIND_MB:-50}
PIN_A=()
PIN_B=()
if [[ ${BENCH_PIN:-0} == 1 ]]; then
	(($(nproc) >= 2)) || { echo "dataplane: BENCH_PIN=1 needs 2 CPUs" >&2; exit 1; }
	PIN_A=(taskset -c 0)
	PIN_B=(taskset -c 1)
fi
TUN_MTU=1420
UNDERLAY_MTU=1500

BENCH_NAME=dataplane
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Unique names: pid + 4 random hex digits; interface names stay <= 15 chars.
TAG="$$$(printf '%04x' $((RANDOM % 65536)))"
NS_A="ipopbench-a-$TAG"
NS_B="ipopbench-b-$TAG"
VETH_A="vb$TAG"a
VETH_B="vb$TAG"b
WG_A="wgb${TAG}a"   # boringtun UAPI sockets live in the shared /var/run/wireguard,
WG_B="wgb${TAG}b"   # so the two ends need distinct interface names.
IPOP_IF="ipop0"     # lives inside our namespaces only; no clash possible

UNDER_A=10.231.0.1
UNDER_B=10.231.0.2
WG_ADDR_A=10.232.0.1
WG_ADDR_B=10.232.0.2
IPOP_ADDR_A=10.77.0.1
IPOP_ADDR_B=10.77.0.2
WG_PORT=51820
IPOP_PORT=51821

WORKDIR=""
PIDS=()          # long-running processes we started (kill by PID at exit)
NS_CREATED=()
IPERF_SRV_PID=""

# Results, keyed by "config:metric".
declare -A RES=()
IPOP_RSS=""
LOAD_START=""
IPOP_DROPS=""

# The tunnel daemons being measured (sender in NS_A, receiver in NS_B) and the
# receiver's tunnel interface; empty for raw veth.
PROBE_PID_A=""
PROBE_PID_B=""
PROBE_TUN_B=""
# Whether `perf stat -e instructions` counts here (set in main).
PERF_INSTRUCTIONS=0
# The largest WireGuard data frame on the veth: Ethernet 14 + IPv4 20 + UDP 8 +
# WireGuard 32 + tunnel MTU.
MAX_FRAME=$((14 + 20 + 8 + 32 + TUN_MTU))

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
	stop_pids "$FG_PID" "$IPERF_SRV_PID" "${PIDS[@]}"
	local ns pid
	for ns in "${NS_CREATED[@]}"; do
		# Anything still running inside our namespaces was started by us.
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			log "killing leftover pid $pid in $ns"
			kill -KILL "$pid" 2>/dev/null
		done
		ip netns del "$ns" 2>/dev/null || log "could not delete netns $ns"
	done
	rm -f "/var/run/wireguard/$WG_A.sock" "/var/run/wireguard/$WG_B.sock"
	[[ -n "$WORKDIR" ]] && rm -rf "$WORKDIR"
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# Foreground helpers only: `in_a cmd &` would make $! the PID of a subshell,
# not of cmd, so background starts spell out `ip netns exec` (which execs cmd
# in place, keeping the PID).
in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

# ---------------------------------------------------------------- prerequisites

ensure_boringtun() {
	if [[ -n "${BORINGTUN_BIN:-}" ]]; then
		[[ -x "$BORINGTUN_BIN" ]] || die "BORINGTUN_BIN=$BORINGTUN_BIN is not executable"
		return 0
	fi
	BORINGTUN_BIN=$(command -v boringtun-cli || true)
	if [[ -z "$BORINGTUN_BIN" && -x "$HOME/.cargo/bin/boringtun-cli" ]]; then
		BORINGTUN_BIN="$HOME/.cargo/bin/boringtun-cli"
	fi
	if [[ -z "$BORINGTUN_BIN" ]]; then
		log "boringtun-cli missing; running cargo install --locked boringtun-cli@0.7.1 (takes minutes)"
		cargo install --locked boringtun-cli@0.7.1 >&2
		BORINGTUN_BIN="$HOME/.cargo/bin/boringtun-cli"
		[[ -x "$BORINGTUN_BIN" ]] || die "boringtun-cli not found after cargo install"
	fi
	log "boringtun: $BORINGTUN_BIN ($("$BORINGTUN_BIN" --version 2>/dev/null || echo '?'))"
}

# One line describing the ipop binary: path, file mtime, and the repo's commit now.
ipop_bin_info() {
	local rev
	rev=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo '?')
	printf '%s (file mtime %s; repo at %s now)' "$IPOP_BIN" "$(date -r "$IPOP_BIN" '+%Y-%m-%d %H:%M:%S')" "$rev"
}

# ---------------------------------------------------------------- network

setup_lan() {
	log "creating namespaces $NS_A, $NS_B and veth pair (MTU $UNDERLAY_MTU)"
	ip netns add "$NS_A"
	NS_CREATED+=("$NS_A")
	ip netns add "$NS_B"
	NS_CREATED+=("$NS_B")
	# Create the pair directly inside the namespaces: nothing appears in the root ns.
	ip link add "$VETH_A" mtu "$UNDERLAY_MTU" netns "$NS_A" type veth \
		peer name "$VETH_B" mtu "$UNDERLAY_MTU" netns "$NS_B"
	in_a ip link set lo up
	in_b ip link set lo up
	in_a ip addr add "$UNDER_A/24" dev "$VETH_A"
	in_b ip addr add "$UNDER_B/24" dev "$VETH_B"
	in_a ip link set "$VETH_A" up
	in_b ip link set "$VETH_B" up
	wait_ping "$UNDER_B" "underlay"
}

# Wait until NS_A can ping ADDR (bounded by UP_TIMEOUT).
wait_ping() {
	local addr=$1 what=$2 i
	for ((i = 0; i < UP_TIMEOUT; i++)); do
		if in_a ping -c 1 -W 1 -q "$addr" >/dev/null 2>&1; then
			return 0
		fi
		log "waiting for $what: $NS_A cannot ping $addr yet ($((i + 1))/$UP_TIMEOUT)"
		sleep 1
	done
	die "$what: $addr not reachable from $NS_A after ${UP_TIMEOUT}s"
}

start_iperf_server() {
	if is_alive "$IPERF_SRV_PID"; then
		return 0
	fi
	[[ -n "$IPERF_SRV_PID" ]] && log "iperf3 server (pid $IPERF_SRV_PID) died; restarting"
	ip netns exec "$NS_B" "${PIN_B[@]}" iperf3 -s >"$WORKDIR/iperf3-server.log" 2>&1 &
	IPERF_SRV_PID=$!
	local i
	for ((i = 0; i < 50; i++)); do
		if in_b ss -Hltn 'sport = :5201' | grep -q .; then
			return 0
		fi
		is_alive "$IPERF_SRV_PID" || die "iperf3 server exited at start"
		sleep 0.1
	done
	die "iperf3 server not listening on :5201 after 5 s"
}

# ---------------------------------------------------------------- measurements

# udp_drops: UDP receive-buffer overflows summed over both namespaces (a hint
# at why a tunnel loses packets; the counters are cumulative per namespace).
udp_drops() {
	local ns total=0 n
	for ns in "$NS_A" "$NS_B"; do
		n=$(ip netns exec "$ns" cat /proc/net/snmp | awk '/^Udp:/ && $2 ~ /^[0-9]+$/ { print $6 }')
		total=$((total + ${n:-0}))
	done
	echo "$total"
}

# if_drops IF_A IF_B: "A rx/tx, B rx/tx" dropped-packet counters of the tunnel
# interfaces (IF_A in NS_A, IF_B in NS_B).
if_drops() {
	local a b
	a=$(ip netns exec "$NS_A" cat "/sys/class/net/$1/statistics/rx_dropped" "/sys/class/net/$1/statistics/tx_dropped" | paste -sd/ -)
	b=$(ip netns exec "$NS_B" cat "/sys/class/net/$2/statistics/rx_dropped" "/sys/class/net/$2/statistics/tx_dropped" | paste -sd/ -)
	echo "A $a, B $b"
}

# cpu_ticks PID: utime+stime of PID, all its threads, in clock ticks.
cpu_ticks() {
	local stat
	stat=$(<"/proc/$1/stat") || return 1
	# The command name (field 2) may hold spaces: count from after its ")".
	stat=${stat##*) }
	awk '{ print $12 + $13 }' <<<"$stat"
}

# counter NS IF NAME: one statistics counter of interface IF in NS.
counter() {
	ip netns exec "$1" cat "/sys/class/net/$2/statistics/$3"
}

# probe_start / probe_stop KEY: CPU of both daemons, TUN writes on the
# receiver and datagrams on its veth over one iperf3 run, summed into
# RES[KEY:...]. The veth counts a UDP GSO train as one packet, so the datagram
# count is taken from its bytes: at least rx_bytes / MAX_FRAME datagrams came.
declare -A P0=()
PERF_PID=""
probe_start() {
	[[ -n "$PROBE_PID_A" ]] || return 0
	P0[t]=$(date +%s%N)
	P0[a]=$(cpu_ticks "$PROBE_PID_A")
	P0[b]=$(cpu_ticks "$PROBE_PID_B")
	P0[tun]=$(counter "$NS_B" "$PROBE_TUN_B" rx_packets)
	P0[veth]=$(counter "$NS_B" "$VETH_B" rx_bytes)
	if ((PERF_INSTRUCTIONS)); then
		perf stat -e instructions -x, -o "$WORKDIR/perf.csv" -p "$PROBE_PID_A,$PROBE_PID_B" \
			>/dev/null 2>&1 &
		PERF_PID=$!
		PIDS+=("$PERF_PID")
	fi
}

probe_stop() {
	local key=$1 now
	[[ -n "$PROBE_PID_A" ]] || return 0
	now=$(date +%s%N)
	RES[$key:ns]=$((${RES[$key:ns]:-0} + now - P0[t]))
	RES[$key:ticks_a]=$((${RES[$key:ticks_a]:-0} + $(cpu_ticks "$PROBE_PID_A") - P0[a]))
	RES[$key:ticks_b]=$((${RES[$key:ticks_b]:-0} + $(cpu_ticks "$PROBE_PID_B") - P0[b]))
	RES[$key:tun]=$((${RES[$key:tun]:-0} + $(counter "$NS_B" "$PROBE_TUN_B" rx_packets) - P0[tun]))
	RES[$key:veth_bytes]=$((${RES[$key:veth_bytes]:-0} + $(counter "$NS_B" "$VETH_B" rx_bytes) - P0[veth]))
	if [[ -n "$PERF_PID" ]]; then
		kill -INT "$PERF_PID" 2>/dev/null
		wait "$PERF_PID" 2>/dev/null || true
		PERF_PID=""
		local n
		n=$(awk -F, '$3 == "instructions" || $3 ~ /^instructions/ { print $1 }' "$WORKDIR/perf.csv")
		[[ "$n" =~ ^[0-9]+$ ]] && RES[$key:instructions]=$((${RES[$key:instructions]:-0} + n))
	fi
	return 0
}

# probe_summary KEY BYTES: the summed probes of KEY as figures; BYTES is what
# iperf3 moved over those runs.
probe_summary() {
	local key=$1 bytes=$2 hz
	[[ -n "${RES[$key:ns]:-}" ]] || return 0
	hz=$(getconf CLK_TCK)
	RES[$key:cpu_a]=$(awk -v t="${RES[$key:ticks_a]}" -v ns="${RES[$key:ns]}" -v hz="$hz" 'BEGIN { printf "%.0f", 100 * t / hz / (ns / 1e9) }')
	RES[$key:cpu_b]=$(awk -v t="${RES[$key:ticks_b]}" -v ns="${RES[$key:ns]}" -v hz="$hz" 'BEGIN { printf "%.0f", 100 * t / hz / (ns / 1e9) }')
	RES[$key:datagrams]=$(((${RES[$key:veth_bytes]} + MAX_FRAME - 1) / MAX_FRAME))
	RES[$key:wpp]=$(awk -v w="${RES[$key:tun]}" -v d="${RES[$key:datagrams]}" 'BEGIN { if (d == 0) print "nan"; else printf "%.3f", w / d }')
	if [[ -n "${RES[$key:instructions]:-}" && "$bytes" -gt 0 ]]; then
		RES[$key:ipmb]=$(awk -v i="${RES[$key:instructions]}" -v b="$bytes" 'BEGIN { printf "%.0f", i / (b / 1e6) }')
	fi
}

median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
		if (NR == 0) { print "nan"; exit }
		if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# iperf_once ADDR STREAMS -> sets IPERF_MBPS (Mbit/s received) and IPERF_RETR
# (TCP retransmits at the sender). Not meant for
# $(...): it must run in the main shell so that PIDs it records are seen by cleanup.
IPERF_MBPS=""
IPERF_RETR=""
IPERF_BYTES=0
iperf_once() {
	local addr=$1 streams=$2 out="$WORKDIR/iperf3-client.json"
	IPERF_MBPS=""
	start_iperf_server
	if ! fg_run "$out" "$WORKDIR/iperf3-client.log" timeout -k 5 $((DURATION + 30)) ip netns exec "$NS_A" "${PIN_A[@]}" \
		iperf3 -c "$addr" -t "$DURATION" -P "$streams" --connect-timeout 5000 -J; then
		log "iperf3 client failed: $(jq -r '.error // empty' "$out" 2>/dev/null || true)"
		cat "$WORKDIR/iperf3-client.log" >&2
		return 1
	fi
	IPERF_MBPS=$(jq -e -r '.end.sum_received.bits_per_second / 1e6' "$out") ||
		{ log "no throughput in iperf3 output"; return 1; }
	IPERF_RETR=$(jq -r '.end.sum_sent.retransmits // "?"' "$out")
	IPERF_BYTES=$(jq -r '.end.sum_received.bytes | floor' "$out")
}

# measure CONFIG ADDR: fills RES[CONFIG:1], RES[CONFIG:4], RES[CONFIG:rtt]
measure() {
	local cfg=$1 addr=$2 streams run v drops0
	drops0=$(udp_drops)
	for streams in 1 4; do
		local -a samples=()
		local moved=0
		for ((run = 1; run <= RUNS; run++)); do
			log "$cfg: iperf3 -P $streams run $run/$RUNS (${DURATION}s) to $addr"
			probe_start
			iperf_once "$addr" "$streams" || die "$cfg: iperf3 -P $streams run $run failed"
			probe_stop "$cfg:$streams"
			moved=$((moved + IPERF_BYTES))
			v=$IPERF_MBPS
			samples+=("$v")
			log "$cfg: -P $streams run $run: $(printf '%.1f' "$v") Mbit/s, $IPERF_RETR retransmits"
		done
		RES[$cfg:$streams]=$(median "${samples[@]}")
		log "$cfg: -P $streams median: $(printf '%.1f' "${RES[$cfg:$streams]}") Mbit/s (samples: ${samples[*]})"
		probe_summary "$cfg:$streams" "$moved"
		[[ -n "${RES[$cfg:$streams:cpu_a]:-}" ]] &&
			log "$cfg: -P $streams: CPU sender ${RES[$cfg:$streams:cpu_a]}%, receiver ${RES[$cfg:$streams:cpu_b]}% of a core;" \
				"receiver TUN writes ${RES[$cfg:$streams:tun]} for >= ${RES[$cfg:$streams:datagrams]} datagrams (${RES[$cfg:$streams:wpp]} per datagram)"
	done
	log "$cfg: ping -c $PING_COUNT -i 0.2 $addr"
	local out
	fg_run "$WORKDIR/ping.out" "$WORKDIR/ping.out" timeout -k 5 $((PING_COUNT + 30)) ip netns exec "$NS_A" "${PIN_A[@]}" \
		ping -c "$PING_COUNT" -i 0.2 -q "$addr" ||
		die "$cfg: ping failed: $(cat "$WORKDIR/ping.out")"
	out=$(<"$WORKDIR/ping.out")
	# rtt min/avg/max/mdev = 0.031/0.045/0.061/0.008 ms
	RES[$cfg:rtt]=$(awk -F'[/ =]+' '/^rtt|^round-trip/ { print $7 }' <<<"$out")
	[[ -n "${RES[$cfg:rtt]}" ]] || die "$cfg: could not parse ping output: $out"
	log "$cfg: RTT avg ${RES[$cfg:rtt]} ms"
	# The same with pings 2 ms apart: the CPUs and caches stay warm between packets, which on
	# a VM separates what the path costs from what waking from idle costs.
	fg_run "$WORKDIR/ping.out" "$WORKDIR/ping.out" timeout -k 5 30 ip netns exec "$NS_A" "${PIN_A[@]}" \
		ping -c "$WARM_PING_COUNT" -i 0.002 -q "$addr" ||
		die "$cfg: ping -i 0.002 failed: $(cat "$WORKDIR/ping.out")"
	out=$(<"$WORKDIR/ping.out")
	RES[$cfg:rtt_warm]=$(awk -F'[/ =]+' '/^rtt|^round-trip/ { print $7 }' <<<"$out")
	[[ -n "${RES[$cfg:rtt_warm]}" ]] || die "$cfg: could not parse ping output: $out"
	log "$cfg: RTT avg ${RES[$cfg:rtt_warm]} ms with pings 2 ms apart"
	RES[$cfg:udpdrops]=$(($(udp_drops) - drops0))
	log "$cfg: UDP receive-buffer drops during the measurements: ${RES[$cfg:udpdrops]}"
}

# ---------------------------------------------------------------- configurations

run_raw() {
	log "=== raw veth ==="
	measure raw "$UNDER_B"
}

run_boringtun() {
	log "=== boringtun-cli ==="
	local d="$WORKDIR/wg" pid_a pid_b
	mkdir -p "$d"
	wg genkey >"$d/a.key"
	wg genkey >"$d/b.key"
	local pub_a pub_b
	pub_a=$(wg pubkey <"$d/a.key")
	pub_b=$(wg pubkey <"$d/b.key")
	local -a bt_args=(--foreground --disable-drop-privileges)
	[[ -n "${BORINGTUN_THREADS:-}" ]] && bt_args+=(--threads "$BORINGTUN_THREADS")

	log "boringtun: starting $WG_A in $NS_A and $WG_B in $NS_B"
	ip netns exec "$NS_A" "${PIN_A[@]}" "$BORINGTUN_BIN" "${bt_args[@]}" "$WG_A" >>"$WORKDIR/boringtun-a.log" 2>&1 &
	pid_a=$!
	PIDS+=("$pid_a")
	ip netns exec "$NS_B" "${PIN_B[@]}" "$BORINGTUN_BIN" "${bt_args[@]}" "$WG_B" >>"$WORKDIR/boringtun-b.log" 2>&1 &
	pid_b=$!
	PIDS+=("$pid_b")

	local i
	for ((i = 0; i < 100; i++)); do
		[[ -S "/var/run/wireguard/$WG_A.sock" && -S "/var/run/wireguard/$WG_B.sock" ]] && break
		is_alive "$pid_a" || die "boringtun-cli in $NS_A exited at start"
		is_alive "$pid_b" || die "boringtun-cli in $NS_B exited at start"
		sleep 0.1
	done
	[[ -S "/var/run/wireguard/$WG_A.sock" && -S "/var/run/wireguard/$WG_B.sock" ]] ||
		die "boringtun UAPI sockets did not appear in /var/run/wireguard within 10 s"

	in_a wg set "$WG_A" private-key "$d/a.key" listen-port "$WG_PORT" \
		peer "$pub_b" allowed-ips "$WG_ADDR_B/32" endpoint "$UNDER_B:$WG_PORT"
	in_b wg set "$WG_B" private-key "$d/b.key" listen-port "$WG_PORT" \
		peer "$pub_a" allowed-ips "$WG_ADDR_A/32" endpoint "$UNDER_A:$WG_PORT"
	in_a ip addr add "$WG_ADDR_A/24" dev "$WG_A"
	in_b ip addr add "$WG_ADDR_B/24" dev "$WG_B"
	in_a ip link set "$WG_A" mtu "$TUN_MTU" up
	in_b ip link set "$WG_B" mtu "$TUN_MTU" up
	wait_ping "$WG_ADDR_B" "boringtun tunnel"

	PROBE_PID_A=$pid_a PROBE_PID_B=$pid_b PROBE_TUN_B=$WG_B
	measure boringtun "$WG_ADDR_B"
	PROBE_PID_A="" PROBE_PID_B="" PROBE_TUN_B=""
	RES[boringtun:ifdrops]=$(if_drops "$WG_A" "$WG_B" || echo '?')
	log "boringtun: tunnel interface rx/tx dropped: ${RES[boringtun:ifdrops]}"

	log "boringtun: stopping (pids $pid_a $pid_b)"
	stop_pids "$pid_a" "$pid_b"
	rm -f "/var/run/wireguard/$WG_A.sock" "/var/run/wireguard/$WG_B.sock"
}

# write_ipop_config DIR OWN_ADDR PEER_PUBKEY PEER_UNDERLAY PEER_ADDR
write_ipop_config() {
	local dir=$1 own=$2 peer_pub=$3 peer_under=$4 peer_addr=$5
	cat >"$dir/ipop.toml" <<EOF
[device]
private_key_file = "ipop.key"
log_level = "warn"
control_socket = "$dir/ipop.sock"

[interface]
name = "$IPOP_IF"
addresses = ["$own/24"]
mtu = $TUN_MTU
listen_port = $IPOP_PORT

[[peers]]
public_key = "$peer_pub"
endpoint = "$peer_under:$IPOP_PORT"
addresses = ["$peer_addr/32"]
EOF
	idle_peers "$dir/ipop.toml"
}

# ipop_status NS CONFIG: `ipop status --json` run inside NS, bounded to 5 s.
ipop_status() {
	timeout -k 2 5 ip netns exec "$1" "$IPOP_BIN" status --json -c "$2"
}

# ipop_connected NS CONFIG: true once every peer (but idle ones) reports state "connected".
ipop_connected() {
	local out
	out=$(ipop_status "$1" "$2" 2>/dev/null) || return 1
	jq -e '[.overlays[0].peers[] | select(.addresses[0] | test("^10\\.77\\.0\\.[12]/"))]
		| length > 0 and all(.[]; .state == "connected")' >/dev/null 2>&1 <<<"$out"
}

# start_ipop_pair [WRAPPER...]: writes both configs (once) and starts both
# daemons, each under WRAPPER when given; waits until both report their peer
# connected and the tunnel answers a ping. Sets IPOP_PID_A and IPOP_PID_B.
IPOP_PID_A=""
IPOP_PID_B=""
start_ipop_pair() {
	local da="$WORKDIR/ipop-a" db="$WORKDIR/ipop-b" pid_a pid_b up_timeout=$UP_TIMEOUT
	(($# > 0)) && up_timeout=$((UP_TIMEOUT * 4))
	if [[ ! -f "$db/ipop.toml" ]]; then
		write_ipop_configs "$da" "$db"
	fi
	log "ipop: starting daemons in $NS_A and $NS_B${1:+ under $1}"
	ip netns exec "$NS_A" "${PIN_A[@]}" "$@" "$IPOP_BIN" up -c "$da/ipop.toml" >"$WORKDIR/ipop-a${1:+-$1}.log" 2>&1 &
	pid_a=$!
	PIDS+=("$pid_a")
	ip netns exec "$NS_B" "${PIN_B[@]}" "$@" "$IPOP_BIN" up -c "$db/ipop.toml" >"$WORKDIR/ipop-b${1:+-$1}.log" 2>&1 &
	pid_b=$!
	PIDS+=("$pid_b")
	IPOP_PID_A=$pid_a
	IPOP_PID_B=$pid_b

	local i
	for ((i = 0; i < up_timeout * 2; i++)); do
		is_alive "$pid_a" || die "ipop in $NS_A exited (see ipop-a.log)"
		is_alive "$pid_b" || die "ipop in $NS_B exited (see ipop-b.log)"
		if ipop_connected "$NS_A" "$da/ipop.toml" && ipop_connected "$NS_B" "$db/ipop.toml"; then
			break
		fi
		((i % 10 == 9)) && log "ipop: waiting for peers to report state \"connected\" ($(((i + 1) / 2))s/${up_timeout}s)"
		sleep 0.5
	done
	if ! { ipop_connected "$NS_A" "$da/ipop.toml" && ipop_connected "$NS_B" "$db/ipop.toml"; }; then
		log "ipop status A: $(ipop_status "$NS_A" "$da/ipop.toml" 2>&1 || true)"
		log "ipop status B: $(ipop_status "$NS_B" "$db/ipop.toml" 2>&1 || true)"
		die "ipop peers not connected after ${up_timeout}s"
	fi
	log "ipop: peers connected"
	wait_ping "$IPOP_ADDR_B" "ipop tunnel"
}

# write_ipop_configs DIR_A DIR_B: keys and configs for the two daemons.
write_ipop_configs() {
	local da=$1 db=$2 pub_a pub_b
	mkdir -p "$da" "$db"
	"$IPOP_BIN" init --static "$da/ipop.toml" >/dev/null
	"$IPOP_BIN" init --static "$db/ipop.toml" >/dev/null
	[[ -f "$da/ipop.key" && -f "$db/ipop.key" ]] || die "ipop init did not write ipop.key"
	pub_a=$("$IPOP_BIN" key -c "$da/ipop.toml" | awk 'NR == 1')
	pub_b=$("$IPOP_BIN" key -c "$db/ipop.toml" | awk 'NR == 1')
	[[ -n "$pub_a" && -n "$pub_b" ]] || die "ipop key printed no public key"
	write_ipop_config "$da" "$IPOP_ADDR_A" "$pub_b" "$UNDER_B" "$IPOP_ADDR_B"
	write_ipop_config "$db" "$IPOP_ADDR_B" "$pub_a" "$UNDER_A" "$IPOP_ADDR_A"
	# Fail early (outside the namespaces) if ipop rejects the config as we wrote it.
	"$IPOP_BIN" key -c "$da/ipop.toml" >/dev/null || die "ipop rejects config $da/ipop.toml"
}

run_ipop() {
	log "=== ipop ==="
	local da="$WORKDIR/ipop-a" db="$WORKDIR/ipop-b" pid_a pid_b
	start_ipop_pair
	pid_a=$IPOP_PID_A
	pid_b=$IPOP_PID_B

	PROBE_PID_A=$pid_a PROBE_PID_B=$pid_b PROBE_TUN_B=$IPOP_IF
	measure ipop "$IPOP_ADDR_B"
	PROBE_PID_A="" PROBE_PID_B="" PROBE_TUN_B=""
	RES[ipop:ifdrops]=$(if_drops "$IPOP_IF" "$IPOP_IF" || echo '?')
	log "ipop: tunnel interface rx/tx dropped: ${RES[ipop:ifdrops]}"

	# ipop's own per-reason drop counters (non-zero ones), as a hint where packets were lost.
	local nonzero='.drops // {} | with_entries(select(.value != 0))'
	IPOP_DROPS="A $(ipop_status "$NS_A" "$da/ipop.toml" 2>/dev/null | jq -c "$nonzero" || echo '?')"
	IPOP_DROPS+=", B $(ipop_status "$NS_B" "$db/ipop.toml" 2>/dev/null | jq -c "$nonzero" || echo '?')"
	log "ipop: drop counters from ipop status: $IPOP_DROPS"

	local hwm_a hwm_b
	[[ "$(readlink "/proc/$pid_a/exe")" == "$(readlink -f "$IPOP_BIN")" ]] ||
		log "warning: pid $pid_a is not $IPOP_BIN; VmHWM may be wrong"
	hwm_a=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid_a/status" 2>/dev/null || true)
	hwm_b=$(awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$pid_b/status" 2>/dev/null || true)
	IPOP_RSS="A (pid $pid_a) ${hwm_a:-?} MB, B (pid $pid_b) ${hwm_b:-?} MB"
	log "ipop: peak RSS (VmHWM): $IPOP_RSS"

	log "ipop: stopping (pids $pid_a $pid_b)"
	stop_pids "$pid_a" "$pid_b"

	((PERF_INSTRUCTIONS)) || ipop_callgrind
}

# ipop_callgrind: both daemons under callgrind; counts are zeroed once the
# link is up, then iperf3 moves CALLGRIND_MB megabytes in one stream, and the
# instructions both executed meanwhile (user space only) are divided by it.
ipop_callgrind() {
	((CALLGRIND_MB > 0)) || return 0
	if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
		log "ipop: no perf instruction counter and no valgrind: no instruction count"
		return 0
	fi
	log "ipop: perf has no instruction counter here; counting under callgrind over $CALLGRIND_MB MB"
	start_ipop_pair valgrind --tool=callgrind "--callgrind-out-file=$WORKDIR/callgrind.%p"
	local pid_a=$IPOP_PID_A pid_b=$IPOP_PID_B pid n out="$WORKDIR/iperf3-callgrind.json"
	for pid in "$pid_a" "$pid_b"; do
		callgrind_control -z "$pid" >/dev/null || die "callgrind_control -z $pid failed"
	done
	start_iperf_server
	fg_run "$out" "$WORKDIR/iperf3-client.log" timeout -k 5 600 ip netns exec "$NS_A" "${PIN_A[@]}" \
		iperf3 -c "$IPOP_ADDR_B" -n "${CALLGRIND_MB}M" --connect-timeout 5000 -J ||
		die "ipop: iperf3 under callgrind failed"
	local bytes
	bytes=$(jq -r '.end.sum_received.bytes | floor' "$out")
	for pid in "$pid_a" "$pid_b"; do
		callgrind_control -d "$pid" >/dev/null || die "callgrind_control -d $pid failed"
		n=$(awk '/^totals:/ { print $2 }' "$WORKDIR/callgrind.$pid.1" 2>/dev/null)
		[[ "$n" =~ ^[0-9]+$ ]] || die "no totals in $WORKDIR/callgrind.$pid.1"
		RES[ipop:cg:$pid]=$n
	done
	RES[ipop:cg_a]=$(awk -v i="${RES[ipop:cg:$pid_a]}" -v b="$bytes" 'BEGIN { printf "%.0f", i / (b / 1e6) }')
	RES[ipop:cg_b]=$(awk -v i="${RES[ipop:cg:$pid_b]}" -v b="$bytes" 'BEGIN { printf "%.0f", i / (b / 1e6) }')
	RES[ipop:cg_mbps]=$(jq -r '.end.sum_received.bits_per_second / 1e6' "$out")
	log "ipop: under callgrind: $bytes bytes; instructions per MB: sender ${RES[ipop:cg_a]}, receiver ${RES[ipop:cg_b]}"
	log "ipop: stopping the callgrind daemons (pids $pid_a $pid_b)"
	stop_pids "$pid_a" "$pid_b"
}

# ---------------------------------------------------------------- idle peers

IDLE_PEERS=${BENCH_IDLE_PEERS:-0}
IDLE_NOW=0   # idle peers that write_ipop_config adds to the configs it writes now

# idle_peers CONFIG: appends IDLE_NOW static peers with random keys, overlay addresses
# 10.77.0.101.. and endpoints 10.231.0.101.. on the bench's veth, where nothing answers: their
# handshakes stop at ARP inside the bench's namespaces, and no traffic flows to them.
idle_peers() {
	local i
	for ((i = 1; i <= IDLE_NOW; i++)); do
		printf '\n[[peers]]\npublic_key = "%s"\nendpoint = "10.231.0.%d:%d"\naddresses = ["10.77.0.%d/32"]\n' \
			"$(head -c 32 /dev/urandom | base64)" $((100 + i)) "$IPOP_PORT" $((100 + i)) >>"$1"
	done
}

# run_idle_peers: ipop without idle peers (unless measured already), then with IDLE_PEERS of
# them; fills RES[ipop_idle:*] and keeps RES[ipop:*] (and the RSS and drops) from the first.
run_idle_peers() {
	[[ -n "${RES[ipop:1]:-}" ]] || run_ipop
	local base1=${RES[ipop:1]} base4=${RES[ipop:4]} basertt=${RES[ipop:rtt]} rss=$IPOP_RSS drops=$IPOP_DROPS
	log "=== ipop with $IDLE_PEERS idle static peers ==="
	IDLE_NOW=$IDLE_PEERS
	local callgrind=$CALLGRIND_MB
	CALLGRIND_MB=0 # the instruction count is of the first run
	rm -rf "$WORKDIR/ipop-a" "$WORKDIR/ipop-b"   # fresh keys and configs
	run_ipop
	CALLGRIND_MB=$callgrind
	IDLE_NOW=0
	RES[ipop_idle:1]=${RES[ipop:1]} RES[ipop_idle:4]=${RES[ipop:4]} RES[ipop_idle:rtt]=${RES[ipop:rtt]}
	RES[ipop:1]=$base1 RES[ipop:4]=$base4 RES[ipop:rtt]=$basertt
	IPOP_RSS=$rss IPOP_DROPS=$drops
}

report_idle_peers() {
	printf '\nipop with %s idle static peers vs none (same run; the machine is shared, figures are noisy):\n' "$IDLE_PEERS"
	printf '%-16s %16s %16s %10s\n' "peers" "1-stream Mbit/s" "4-stream Mbit/s" "RTT ms"
	printf '%-16s %16s %16s %10s\n' "none" "$(fmt "${RES[ipop:1]:-}" '%.1f')" "$(fmt "${RES[ipop:4]:-}" '%.1f')" "$(fmt "${RES[ipop:rtt]:-}" '%.3f')"
	printf '%-16s %16s %16s %10s\n' "$IDLE_PEERS idle" "$(fmt "${RES[ipop_idle:1]:-}" '%.1f')" "$(fmt "${RES[ipop_idle:4]:-}" '%.1f')" "$(fmt "${RES[ipop_idle:rtt]:-}" '%.3f')"
	printf '%-16s %16s %16s %10s\n' "idle/none" "$(ratio "${RES[ipop_idle:1]:-}" "${RES[ipop:1]:-}")" \
		"$(ratio "${RES[ipop_idle:4]:-}" "${RES[ipop:4]:-}")" "$(ratio "${RES[ipop_idle:rtt]:-}" "${RES[ipop:rtt]:-}")"
}

# ---------------------------------------------------------------- report

fmt() { # fmt VALUE PRINTF_FORMAT
	# shellcheck disable=SC2059 # the format is the second argument by design
	if [[ -z "$1" || "$1" == nan ]]; then printf 'n/a'; else printf "$2" "$1"; fi
}

ratio() { # ratio A B -> A/B formatted, or n/a
	if [[ -z "$1" || -z "$2" ]]; then
		printf 'n/a'
	else
		awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.3fx", a / b }'
	fi
}

report() {
	local cfg label
	printf '\nipop data-plane benchmark  (%s; kernel %s; %s CPUs; iperf3 %ss x %s runs, median; ping -c %s -i 0.2; tunnel MTU %s, underlay MTU %s)\n\n' \
		"$(date '+%Y-%m-%d %H:%M:%S')" "$(uname -r)" "$(nproc)" "$DURATION" "$RUNS" "$PING_COUNT" "$TUN_MTU" "$UNDERLAY_MTU"
	if ((${#PIN_A[@]})); then
		printf 'each end pinned to its own CPU (BENCH_PIN=1): A on CPU 0, B on CPU 1\n\n'
	fi
	printf 'load average (1/5/15 min) at start: %s; at end: %s  (other CPU load on this 2-core box skews results)\n\n' \
		"$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)"
	printf '%-16s %16s %16s %10s\n' "configuration" "1-stream Mbit/s" "4-stream Mbit/s" "RTT ms"
	printf '%-16s %16s %16s %10s\n' "----------------" "---------------" "---------------" "------"
	for cfg in raw boringtun ipop; do
		case $cfg in
		raw) label="raw veth" ;;
		boringtun) label="boringtun 0.7.1" ;;
		ipop) label="ipop" ;;
		esac
		printf '%-16s %16s %16s %10s\n' "$label" \
			"$(fmt "${RES[$cfg:1]:-}" '%.1f')" "$(fmt "${RES[$cfg:4]:-}" '%.1f')" "$(fmt "${RES[$cfg:rtt]:-}" '%.3f')"
	done
	for cfg in raw boringtun; do
		printf '%-16s %16s %16s %10s\n' "ipop/$cfg" \
			"$(ratio "${RES[ipop:1]:-}" "${RES[$cfg:1]:-}")" \
			"$(ratio "${RES[ipop:4]:-}" "${RES[$cfg:4]:-}")" \
			"$(ratio "${RES[ipop:rtt]:-}" "${RES[$cfg:rtt]:-}")"
	done
	if [[ -n "${RES[ipop:rtt]:-}" && -n "${RES[raw:rtt]:-}" ]]; then
		printf '\nipop idle RTT added over raw veth: %s ms\n' \
			"$(awk -v a="${RES[ipop:rtt]}" -v b="${RES[raw:rtt]}" 'BEGIN { printf "%.3f", a - b }')"
		printf 'with pings 2 ms apart (CPUs warm): raw %s ms, ipop %s ms, added %s ms\n' \
			"$(fmt "${RES[raw:rtt_warm]:-}" '%.3f')" "$(fmt "${RES[ipop:rtt_warm]:-}" '%.3f')" \
			"$(awk -v a="${RES[ipop:rtt_warm]}" -v b="${RES[raw:rtt_warm]}" 'BEGIN { printf "%.3f", a - b }')"
	fi
	printf '\nduring the iperf3 runs  (CPU: %% of one core, utime+stime; TUN writes: receiver TUN rx packets per WireGuard datagram on its veth)\n'
	printf '%-16s %8s %14s %14s %16s\n' "tunnel" "streams" "sender CPU %" "receiver CPU %" "TUN writes/pkt"
	local streams
	for cfg in boringtun ipop; do
		for streams in 1 4; do
			[[ -n "${RES[$cfg:$streams:cpu_a]:-}" ]] || continue
			printf '%-16s %8s %14s %14s %16s\n' "$cfg" "$streams" "${RES[$cfg:$streams:cpu_a]}" \
				"${RES[$cfg:$streams:cpu_b]}" "${RES[$cfg:$streams:wpp]}"
		done
	done
	if [[ -n "${RES[ipop:1:ipmb]:-}" ]]; then
		printf '\nipop instructions per transferred MB (perf stat, both daemons, kernel and user): 1 stream %s, 4 streams %s\n' \
			"${RES[ipop:1:ipmb]}" "${RES[ipop:4:ipmb]:-n/a}"
	elif [[ -n "${RES[ipop:cg_a]:-}" ]]; then
		printf '\nipop instructions per transferred MB (callgrind, user space only, %s MB in one stream at %.0f Mbit/s under callgrind): sender %s, receiver %s\n' \
			"$CALLGRIND_MB" "${RES[ipop:cg_mbps]}" "${RES[ipop:cg_a]}" "${RES[ipop:cg_b]}"
	else
		printf '\nipop instructions per transferred MB: n/a\n'
	fi
	[[ " $CONFIGS " == *" ipop "* ]] && printf '\nipop binary: %s\n' "$(ipop_bin_info)"
	printf '\nipop peak RSS (VmHWM): %s\n' "${IPOP_RSS:-n/a}"
	printf 'UDP receive-buffer drops in the namespaces during the runs: boringtun %s, ipop %s\n' \
		"${RES[boringtun:udpdrops]:-n/a}" "${RES[ipop:udpdrops]:-n/a}"
	printf 'tunnel interface rx/tx dropped: boringtun %s; ipop %s\n' \
		"${RES[boringtun:ifdrops]:-n/a}" "${RES[ipop:ifdrops]:-n/a}"
	printf 'ipop drop counters (ipop status, non-zero only): %s\n' "${IPOP_DROPS:-n/a}"
}

# ---------------------------------------------------------------- main

main() {
	[[ $EUID -eq 0 ]] || die "must run as root (creates network namespaces)"
	[[ "$DURATION" =~ ^[0-9]+$ && "$DURATION" -gt 0 ]] || die "BENCH_DURATION must be a positive integer"
	[[ "$RUNS" =~ ^[0-9]+$ && "$RUNS" -gt 0 ]] || die "BENCH_RUNS must be a positive integer"
	[[ "$PING_COUNT" =~ ^[0-9]+$ && "$PING_COUNT" -gt 0 ]] || die "BENCH_PING_COUNT must be a positive integer"
	[[ "$UP_TIMEOUT" =~ ^[0-9]+$ && "$UP_TIMEOUT" -gt 0 ]] || die "BENCH_UP_TIMEOUT must be a positive integer"
	[[ "$CALLGRIND_MB" =~ ^[0-9]+$ ]] || die "BENCH_CALLGRIND_MB must be a non-negative integer"
	local cfg
	for cfg in $CONFIGS; do
		case $cfg in raw | boringtun | ipop) ;; *) die "unknown configuration in BENCH_CONFIGS: $cfg" ;; esac
	done

	ensure_packages iperf3:iperf3 wg:wireguard-tools ip:iproute2 ping:iputils-ping jq:jq \
		timeout:coreutils
	if perf stat -e instructions -x, -- true 2>&1 | grep -q '^[0-9]*,,instructions'; then
		PERF_INSTRUCTIONS=1
	else
		log "perf stat cannot count instructions here (no hardware counters)"
		if ((CALLGRIND_MB > 0)) && ! command -v callgrind_control >/dev/null; then
			log "installing valgrind to count instructions under callgrind"
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind >&2 ||
				log "valgrind could not be installed: no instruction count"
		fi
	fi
	if [[ " $CONFIGS " == *" boringtun "* ]]; then ensure_boringtun; fi
	if [[ " $CONFIGS " == *" ipop "* ]]; then ensure_release_binaries ipop:ipop; fi

	WORKDIR=$(mktemp -d /tmp/ipop-dataplane.XXXXXX)
	chmod 700 "$WORKDIR"
	umask 077

	LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
	log "load average before measuring: $LOAD_START"
	setup_lan
	start_iperf_server
	if ! [[ "$IDLE_PEERS" =~ ^[0-9]+$ ]] || ((IDLE_PEERS > 100)); then
		die "BENCH_IDLE_PEERS must be 0..100"
	fi
	for cfg in $CONFIGS; do
		"run_$cfg"
	done
	if ((IDLE_PEERS > 0)); then run_idle_peers; fi
	report
	if ((IDLE_PEERS > 0)); then report_idle_peers; fi
}

main "$@"

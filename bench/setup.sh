#!/usr/bin/env bash
# bench/setup.sh - link set-up time benchmark (issue "NAT traversal", item 6).
#
# Builds a fake IPv4 internet (198.18.0.0/15, a bridge in a namespace of its own) with a
# server namespace running Prosody and coturn, and three pairs of ipop devices:
#   lan   two devices straight on the bridge (no NAT);
#   cone  each device behind its own port-restricted-cone NAT router
#         (nftables `masquerade persistent`: the source port is kept, only replies get in);
#   relay each device behind a symmetric NAT router (`masquerade fully-random`), so the
#         link has to go through coturn;
#   mapped as relay, but device a's router runs miniupnpd (UPnP IGD, NAT-PMP, PCP), so
#         that ipop gets a port mapping and the link is direct through it;
#   peer  as relay, but with no TURN server: a third device on the internet, a friend of
#         both users with `[relay] enabled`, forwards for them.
# For each pair it measures, over SETUP_RUNS runs, the time from "both daemons report
# .xmpp.state == online" to the first ping reply across the overlay, and prints the median
# beside the target (<= 1 s lan, <= 2 s cone and mapped, <= 5 s relay). Then it measures
# iperf3 TCP throughput (1 stream) over the direct (cone), relayed and mapped links, with the
# CPU that each daemon and coturn (or the relaying device) used meanwhile.
#
# The devices of a pair are XMPP contacts of each other: their rosters are written into
# Prosody's data directory before it starts. Each run starts both daemons afresh (on a new
# UDP port, so that conntrack entries of earlier runs in the routers play no part) and
# stops them by PID afterwards; Prosody and coturn stay up across runs.
#
# Must run as root. Everything it creates (namespaces, processes, temp files) is removed on
# exit, including on error and Ctrl-C. Traffic stays between the namespaces it creates.
#
# Environment:
#   SETUP_RUNS           runs per topology, median taken        (default 5)
#   SETUP_IPERF_SECONDS  seconds per iperf3 run                 (default 10)
#   SETUP_TIMEOUT        seconds to wait for "online", and again for the first reply (default 30)
#   SETUP_TOPOLOGIES     which topologies to run     (default "lan cone relay mapped peer")
#   SETUP_IPERF_UDP      if set, Mbit/s of iperf3 UDP to offer over each link after the TCP
#                        run (1372-byte datagrams, which fit the tunnel's MTU): what each path
#                        delivers when the sender does not slow down for losses (default unset)
#   IPOP_BIN             ipop binary; if unset, target/release/ipop, (re)built with
#                        `cargo build --release` when missing or older than the sources

set -euo pipefail

RUNS=${SETUP_RUNS:-5}
IPERF_SECONDS=${SETUP_IPERF_SECONDS:-10}
TIMEOUT=${SETUP_TIMEOUT:-30}
TOPOLOGIES=${SETUP_TOPOLOGIES:-lan cone relay mapped peer}
UDP_MBIT=${SETUP_IPERF_UDP:-}

BENCH_NAME=setup
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DOMAIN=example.org
SERVER_IP=198.18.0.10
# coturn's second address: miniupnpd's STUN test (RFC 5780) needs answers from two.
SERVER_ALT_IP=198.18.0.11
XMPP_PORT=5222
TURN_PORT=3478
TURN_SECRET="ipop-bench-secret-$RANDOM$RANDOM"
TURN_REALM=ipop.test
OVERLAY_A=10.78.0.1
OVERLAY_B=10.78.0.2
BASE_PORT=51820

declare -A TARGET=([lan]=1 [cone]=2 [relay]=5 [mapped]=2 [peer]=5)

TAG="$$"
NS_PREFIX="ipsb$TAG-"
WORKDIR=""
NAMESPACES=()
PIDS=()
DAEMON_PIDS=()

declare -A FROM_START=() MEDIAN=() MIN=() MAX=() PATHS=() THROUGHPUT=() THROUGHPUT_UDP=() SAMPLES=()

cleanup() {
	local rc=$? ns
	trap - EXIT INT TERM
	if ((${#DAEMON_PIDS[@]})); then stop_pids "${DAEMON_PIDS[@]}"; fi
	if ((${#PIDS[@]})); then stop_pids "${PIDS[@]}"; fi
	for ns in "${NAMESPACES[@]}"; do
		ip netns del "$ns" 2>/dev/null || true
	done
	if [[ -n "$WORKDIR" && -d "$WORKDIR" ]]; then
		if ((rc != 0)); then
			log "logs of the failed run:"
			tail -n 15 "$WORKDIR"/*/*.log >&2 2>/dev/null || true
		fi
		rm -rf "$WORKDIR"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- checks and build

[[ $EUID -eq 0 ]] || die "must run as root (namespaces, nftables, TUN devices)"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "SETUP_RUNS must be a positive integer"
[[ "$IPERF_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "SETUP_IPERF_SECONDS must be a positive integer"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "SETUP_TIMEOUT must be a positive integer"
[[ -z "$UDP_MBIT" || "$UDP_MBIT" =~ ^[1-9][0-9]*$ ]] || die "SETUP_IPERF_UDP must be a positive integer (Mbit/s)"
for tool in ip nft prosody prosodyctl turnserver iperf3 jq openssl ping awk miniupnpd; do
	command -v "$tool" >/dev/null || die "$tool not found"
done

ensure_release_binaries ipop:ipop
IPOP=$IPOP_BIN

WORKDIR=$(mktemp -d /tmp/ipop-setup-bench.XXXXXX)

# ---------------------------------------------------------------- network

# nsx NS CMD...: run CMD in our namespace NS. (Background processes are started with
# `ip netns exec` itself, not through this function, so that $! is their PID.)
nsx() {
	local ns=$1
	shift
	ip netns exec "$NS_PREFIX$ns" "$@"
}

new_ns() {
	local name=$NS_PREFIX$1
	ip netns add "$name"
	NAMESPACES+=("$name")
	ip -n "$name" link set lo up
	nsx "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
}

# link A IF_A B IF_B: a veth pair, IF_A in namespace A and IF_B in B, both up.
link() {
	ip -n "$NS_PREFIX$1" link add "$2" type veth peer name "$4" netns "$NS_PREFIX$3"
	ip -n "$NS_PREFIX$1" link set "$2" up
	ip -n "$NS_PREFIX$3" link set "$4" up
}

# attach NS IF PORT: plug NS (interface IF) into the internet bridge (port PORT).
attach() {
	link net "$3" "$1" "$2"
	ip -n "${NS_PREFIX}net" link set "$3" master br0
}

# router NAME WAN_IP LAN_NET(x: 192.168.x.0/24) FLAGS DEVICE: a NAT router with one device.
router() {
	local r=$1 wan_ip=$2 x=$3 flags=$4 dev=$5
	new_ns "$r"
	nsx "$r" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=2 \
		net.ipv4.conf.default.rp_filter=2
	attach "$r" wan "p$r"
	ip -n "$NS_PREFIX$r" addr add "$wan_ip/15" dev wan
	new_ns "$dev"
	link "$r" lan "$dev" eth0
	ip -n "$NS_PREFIX$r" addr add "192.168.$x.1/24" dev lan
	ip -n "$NS_PREFIX$dev" addr add "192.168.$x.2/24" dev eth0
	ip -n "$NS_PREFIX$dev" route add default via "192.168.$x.1"
	# Filtering: only replies to what went out (conntrack) get in, i.e. per remote ip:port.
	nsx "$r" nft -f - <<-EOF
		table ip bench {
		  chain postrouting {
		    type nat hook postrouting priority srcnat; policy accept;
		    oifname "wan" ip saddr 192.168.$x.0/24 masquerade $flags
		  }
		  chain forward {
		    type filter hook forward priority filter; policy drop;
		    ct state established,related accept
		    iifname "lan" oifname "wan" accept
		  }
		  chain input {
		    type filter hook input priority filter; policy accept;
		    iifname "wan" ct state established,related accept
		    iifname "wan" icmp type echo-request accept
		    iifname "wan" drop
		  }
		}
	EOF
}

log "building the lab (namespaces prefixed $NS_PREFIX)"
new_ns net
ip -n "${NS_PREFIX}net" link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0
ip -n "${NS_PREFIX}net" link set br0 up
new_ns srv
attach srv eth0 psrv
ip -n "${NS_PREFIX}srv" addr add "$SERVER_IP/15" dev eth0
ip -n "${NS_PREFIX}srv" addr add "$SERVER_ALT_IP/15" dev eth0
# A real server's default route leads somewhere; without one coturn drops allocations that
# fail to relay toward an unroutable (private) address.
ip -n "${NS_PREFIX}srv" route add default via 198.18.0.1
# lan: both devices on the bridge, public addresses.
new_ns lana
attach lana eth0 plana
ip -n "${NS_PREFIX}lana" addr add 198.18.0.101/15 dev eth0
new_ns lanb
attach lanb eth0 planb
ip -n "${NS_PREFIX}lanb" addr add 198.18.0.102/15 dev eth0
# cone: port-restricted cone NATs; relay: symmetric NATs.
router conera 198.18.0.111 1 persistent conea
router conerb 198.18.0.112 2 persistent coneb
router relayra 198.18.0.113 3 fully-random relaya
router relayrb 198.18.0.114 4 fully-random relayb
# mapped: symmetric NATs, the first one mapping ports on request (miniupnpd, started once
# coturn is up). Its router forwards what a mapping DNATs, and takes the answers of
# miniupnpd's STUN test from the server's two addresses.
router mappedra 198.18.0.115 5 fully-random mappeda
router mappedrb 198.18.0.116 6 fully-random mappedb
nsx mappedra nft insert rule ip bench forward ct status dnat accept
nsx mappedra nft insert rule ip bench input iifname wan ip saddr "{ $SERVER_IP, $SERVER_ALT_IP }" meta l4proto udp accept
# peer: symmetric NATs again, and the relaying device on the internet.
router peerra 198.18.0.117 7 fully-random peera
router peerrb 198.18.0.118 8 fully-random peerb
new_ns peerrelay
attach peerrelay eth0 ppeerrelay
ip -n "${NS_PREFIX}peerrelay" addr add 198.18.0.119/15 dev eth0

# wait_tcp NS IP PORT WHAT: until a TCP connect succeeds (at most 20 s).
wait_tcp() {
	local i
	for ((i = 0; i < 200; i++)); do
		if nsx "$1" timeout 1 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
		sleep 0.1
	done
	die "$4 does not accept connections on $2:$3"
}

# ---------------------------------------------------------------- Prosody

PROSODY_DIR=$WORKDIR/prosody
mkdir -p "$PROSODY_DIR/data" "$PROSODY_DIR/certs"
CERTS=$PROSODY_DIR/certs
log "making a test CA and a server certificate for $DOMAIN"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout "$CERTS/ca.key" -out "$CERTS/ca.crt" -days 2 -subj "/CN=ipop setup bench CA" \
	-addext "basicConstraints=critical,CA:TRUE" \
	-addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
	-keyout "$CERTS/server.key" -out "$CERTS/server.csr" -subj "/CN=$DOMAIN" 2>/dev/null
cat >"$CERTS/leaf.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$DOMAIN,DNS:conference.$DOMAIN
EOF
openssl x509 -req -in "$CERTS/server.csr" -CA "$CERTS/ca.crt" -CAkey "$CERTS/ca.key" \
	-set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$CERTS/leaf.ext" \
	-out "$CERTS/server.crt" 2>/dev/null
CA_FILE=$CERTS/ca.crt

PROSODY_CFG=$PROSODY_DIR/prosody.cfg.lua
cat >"$PROSODY_CFG" <<EOF
-- Written by bench/setup.sh.
run_as_root = true
pidfile = "$PROSODY_DIR/prosody.pid"
data_path = "$PROSODY_DIR/data"
log = { info = "$PROSODY_DIR/prosody.log" }
interfaces = { "$SERVER_IP" }
c2s_ports = { $XMPP_PORT }
c2s_direct_tls_ports = { }
s2s_ports = { }
http_ports = { }
https_ports = { }
modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "presence"; "message"; "iq"; "limits" }
modules_disabled = { "s2s"; "http"; "posix"; "offline" }
authentication = "internal_hashed"
c2s_require_encryption = true
allow_unencrypted_plain_auth = false
limits = { c2s = { rate = "10mb/s" } }
ssl = { key = "$CERTS/server.key"; certificate = "$CERTS/server.crt" }
VirtualHost "$DOMAIN"
Component "conference.$DOMAIN" "muc"
  muc_room_default_public_jids = true
  restrict_room_creation = false
EOF

password() { printf 'pw-%s-secret' "$1"; }

# Two users per topology (<topo>0, <topo>1), contacts of each other with subscription "both":
# accounts through prosodyctl, rosters written straight into the data directory (the domain's
# directory name is percent-escaped, as Prosody's datamanager does).
ROSTER_DIR=$PROSODY_DIR/data/${DOMAIN//./%2e}/roster
mkdir -p "$ROSTER_DIR"
# write_roster USER CONTACT...: USER's roster, every CONTACT with subscription "both".
write_roster() {
	local user=$1 contact
	shift
	{
		echo 'return {'
		echo '	[false] = { version = 1; pending = {}; };'
		for contact in "$@"; do
			echo "	[\"$contact@$DOMAIN\"] = { subscription = \"both\"; groups = {}; };"
		done
		echo '};'
	} >"$ROSTER_DIR/$user.dat"
}
for topo in $TOPOLOGIES; do
	[[ -n "${TARGET[$topo]:-}" ]] || die "unknown topology $topo (lan, cone, relay, mapped, peer)"
	for u in "${topo}0" "${topo}1"; do
		prosodyctl --config "$PROSODY_CFG" register "$u" "$DOMAIN" "$(password "$u")" >/dev/null
	done
	if [[ $topo == peer ]]; then
		prosodyctl --config "$PROSODY_CFG" register peerr "$DOMAIN" "$(password peerr)" >/dev/null
		write_roster peer0 peer1 peerr
		write_roster peer1 peer0 peerr
		write_roster peerr peer0 peer1
	else
		write_roster "${topo}0" "${topo}1"
		write_roster "${topo}1" "${topo}0"
	fi
done
log "starting Prosody on $SERVER_IP:$XMPP_PORT"
ip netns exec "${NS_PREFIX}srv" prosody --config "$PROSODY_CFG" -F >"$PROSODY_DIR/prosody.out" 2>&1 &
PIDS+=("$!")
wait_tcp srv "$SERVER_IP" "$XMPP_PORT" Prosody

# ---------------------------------------------------------------- coturn

TURN_DIR=$WORKDIR/coturn
mkdir -p "$TURN_DIR"
cat >"$TURN_DIR/turnserver.conf" <<EOF
# Written by bench/setup.sh.
listening-ip=$SERVER_IP
listening-ip=$SERVER_ALT_IP
listening-port=$TURN_PORT
relay-ip=$SERVER_IP
min-port=49152
max-port=65535
realm=$TURN_REALM
use-auth-secret
static-auth-secret=$TURN_SECRET
allow-loopback-peers
no-multicast-peers
no-tls
no-dtls
no-cli
userdb=$TURN_DIR/turndb
pidfile=$TURN_DIR/turnserver.pid
log-file=$TURN_DIR/turnserver.log
simple-log
no-stdout-log
EOF
log "starting coturn on $SERVER_IP:$TURN_PORT"
ip netns exec "${NS_PREFIX}srv" turnserver -c "$TURN_DIR/turnserver.conf" >"$TURN_DIR/turnserver.out" 2>&1 &
TURN_PID=$!
PIDS+=("$TURN_PID")
wait_tcp srv "$SERVER_IP" "$TURN_PORT" coturn

# ---------------------------------------------------------------- miniupnpd

# On the mapped topology's first router. It writes its rules into chains of a table that must
# exist, whose NAT chains run just before the router's own; it maps ports only once its STUN
# test against coturn says its WAN address takes unsolicited packets (the lab's addresses are
# reserved ones, which it refuses otherwise).
if [[ " $TOPOLOGIES " == *" mapped "* ]]; then
	UPNP_DIR=$WORKDIR/miniupnpd
	mkdir -p "$UPNP_DIR"
	nsx mappedra nft -f - <<-EOF
		table inet miniupnpd {
		  chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
		  chain miniupnpd { }
		  chain prerouting { type nat hook prerouting priority -101; policy accept; jump prerouting_miniupnpd; }
		  chain postrouting { type nat hook postrouting priority 99; policy accept; jump postrouting_miniupnpd; }
		  chain prerouting_miniupnpd { }
		  chain postrouting_miniupnpd { }
		}
	EOF
	cat >"$UPNP_DIR/miniupnpd.conf" <<-EOF
		ext_ifname=wan
		listening_ip=lan
		ext_perform_stun=yes
		ext_stun_host=$SERVER_IP
		ext_stun_port=$TURN_PORT
		enable_upnp=yes
		enable_natpmp=yes
		secure_mode=yes
		lease_file=$UPNP_DIR/leases
		upnp_table_name=miniupnpd
		upnp_nat_table_name=miniupnpd
		upnp_forward_chain=miniupnpd
		upnp_nat_chain=prerouting_miniupnpd
		upnp_nat_postrouting_chain=postrouting_miniupnpd
		allow 1024-65535 192.168.5.0/24 1024-65535
		deny 0-65535 0.0.0.0/0 0-65535
	EOF
	log "starting miniupnpd on the mapped topology's router"
	ip netns exec "${NS_PREFIX}mappedra" miniupnpd -f "$UPNP_DIR/miniupnpd.conf" \
		-P "$UPNP_DIR/miniupnpd.pid" -d >"$UPNP_DIR/miniupnpd.log" 2>&1 &
	PIDS+=("$!")
	for ((i = 0; i < 100; i++)); do
		grep -q "Port forwarding is now enabled" "$UPNP_DIR/miniupnpd.log" && break
		sleep 0.1
	done
	grep -q "Port forwarding is now enabled" "$UPNP_DIR/miniupnpd.log" ||
		die "miniupnpd does not map ports (log $UPNP_DIR/miniupnpd.log)"
fi

# TURN REST credentials: username "<expiry>:<name>", password base64(HMAC-SHA1(secret, username)).
turn_password() {
	printf '%s' "$1" | openssl dgst -sha1 -hmac "$TURN_SECRET" -binary | base64
}

# ---------------------------------------------------------------- devices

# write_config DIR USER OVERLAY_IP PORT PEER_USER PEER_IP: the device numbers its peer
# PEER_IP in the social overlay (its state says so), so that the ping can start before the link
# is up.
write_config() {
	local dir=$1 user=$2 addr=$3 port=$4 peer=$5 peer_ip=$6 turn_user
	turn_user="$(($(date +%s) + 3600)):$user"
	mkdir -p "$dir/state"
	printf '{"social": {"%s@%s/dev": "%s"}}\n' "$peer" "$DOMAIN" "$peer_ip" >"$dir/state/state.json"
	cat >"$dir/ipop.toml" <<EOF
[device]
log_level = "info"
control_socket = "$dir/ctl.sock"
state_dir = "$dir/state"

[interface]
listen_port = $port

[xmpp]
jid = "$user@$DOMAIN"
password = "$(password "$user")"
server = "$SERVER_IP:$XMPP_PORT"
ca_file = "$CA_FILE"
device = "dev"

[social]
subnet = "10.78.0.0/16"
address = "$addr"

[nat]
stun = ["$SERVER_IP:$TURN_PORT"]
EOF
	# The peer topology's devices have no TURN server: a friend relays.
	[[ $user == peer* ]] || cat >>"$dir/ipop.toml" <<EOF

[[nat.turn]]
server = "$SERVER_IP:$TURN_PORT"
username = "$turn_user"
password = "$(turn_password "$turn_user")"
EOF
}

for topo in $TOPOLOGIES; do
	for side in a b; do
		dir=$WORKDIR/$topo$side
		mkdir -p "$dir"
		"$IPOP" init --static "$dir/ipop.toml" >/dev/null
	done
done

# The peer topology's relaying device: up once, for every run.
RELAY_PID=""
if [[ " $TOPOLOGIES " == *" peer "* ]]; then
	dir=$WORKDIR/peerr
	mkdir -p "$dir"
	"$IPOP" init --static "$dir/ipop.toml" >/dev/null
	write_config "$dir" peerr 10.78.0.3 51900 peer0 "$OVERLAY_A"
	# Rates above what the lab can carry: the benchmark measures the forwarding, not the limits.
	printf '\n[relay]\nenabled = true\npair_rate = 100000\ntotal_rate = 100000\n' >>"$dir/ipop.toml"
	log "starting the relaying device of the peer topology"
	ip netns exec "${NS_PREFIX}peerrelay" "$IPOP" up -c "$dir/ipop.toml" >>"$dir/ipop.log" 2>&1 &
	RELAY_PID=$!
	PIDS+=("$RELAY_PID")
fi

# status NS DIR: `ipop status --json` of the device (empty on error).
status() {
	nsx "$1" "$IPOP" status --json -c "$2/ipop.toml" 2>/dev/null || true
}

xmpp_state() {
	status "$1" "$2" | jq -r '.xmpp.state // empty' 2>/dev/null || true
}

start_daemon() {
	ip netns exec "$NS_PREFIX$1" "$IPOP" up -c "$2/ipop.toml" >>"$2/ipop.log" 2>&1 &
	DAEMON_PIDS+=("$!")
}

stop_daemons() {
	if ((${#DAEMON_PIDS[@]})); then stop_pids "${DAEMON_PIDS[@]}"; fi
	DAEMON_PIDS=()
}

# one_run TOPO RUN: sets RUN_DT to the seconds from both online to the first reply. (Not run
# in a subshell: the daemons' PIDs must reach DAEMON_PIDS.)
# RUN_TOTAL: from starting the daemons to the first reply, for reference.
RUN_DT=""
RUN_TOTAL=""
one_run() {
	local topo=$1 run=$2 dir_a=$WORKDIR/${1}a dir_b=$WORKDIR/${1}b i sa sb ts t0 out t1
	write_config "$dir_a" "${topo}0" "$OVERLAY_A" $((BASE_PORT + 2 * run)) "${topo}1" "$OVERLAY_B"
	write_config "$dir_b" "${topo}1" "$OVERLAY_B" $((BASE_PORT + 2 * run + 1)) "${topo}0" "$OVERLAY_A"
	ts=$EPOCHREALTIME
	start_daemon "${topo}a" "$dir_a"
	start_daemon "${topo}b" "$dir_b"
	sa="" sb=""
	for ((i = 0; i < TIMEOUT * 20; i++)); do
		[[ "$sa" == online ]] || sa=$(xmpp_state "${topo}a" "$dir_a")
		[[ "$sb" == online ]] || sb=$(xmpp_state "${topo}b" "$dir_b")
		[[ "$sa" == online && "$sb" == online ]] && break
		is_alive "${DAEMON_PIDS[0]}" || die "$topo: device a exited (log $dir_a/ipop.log)"
		is_alive "${DAEMON_PIDS[1]}" || die "$topo: device b exited (log $dir_b/ipop.log)"
		sleep 0.05
	done
	[[ "$sa" == online && "$sb" == online ]] ||
		die "$topo: devices not online within ${TIMEOUT}s (a: '$sa', b: '$sb')"
	t0=$EPOCHREALTIME
	# One echo request every 50 ms until the first reply (-c 1) or the deadline; -D stamps
	# the reply line with the time it arrived.
	out=$(nsx "${topo}a" ping -D -n -i 0.05 -c 1 -w "$TIMEOUT" "$OVERLAY_B" 2>&1 || true)
	t1=$(awk -F'[][]' '/bytes from/ { print $2; exit }' <<<"$out")
	[[ -n "$t1" ]] || die "$topo: no ping reply within ${TIMEOUT}s after both were online"
	RUN_DT=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
	RUN_TOTAL=$(awk -v a="$ts" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
}

# peer_path TOPO: the path device a reports for its peer (direct, relay, ...).
peer_path() {
	status "${1}a" "$WORKDIR/${1}a" |
		jq -r '[.overlays[]?.peers[]? | .path // empty] | first // "?"' 2>/dev/null || echo "?"
}

# rcvbuf_drops NS: datagrams dropped in namespace NS because a socket's receive buffer was full.
rcvbuf_drops() {
	nsx "$1" nstat -az UdpRcvbufErrors 2>/dev/null | awk '$1 == "UdpRcvbufErrors" { print $2; found = 1 } END { if (!found) print 0 }'
}

# cpu_ticks PID: the user and system CPU time PID has used, in clock ticks.
cpu_ticks() {
	awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# iperf TOPO [MBIT]: sets IPERF_MBPS to the Mbit/s received, device a -> device b over the
# overlay, 1 TCP stream (or, with MBIT, UDP offered at MBIT Mbit/s), CPU[KEY] to the share of a
# core that device a, device b and coturn used meanwhile, and DROPS[KEY] to the datagrams
# coturn's sockets dropped meanwhile (receive buffers full); KEY is TOPO, or TOPO-udp.
IPERF_MBPS=""
declare -A CPU=() DROPS=()
iperf() {
	local topo=$1 key=$1${2:+-udp} srv_pid out i pid t0 drops0 before=() after=() udp=()
	[[ -n "${2:-}" ]] && udp=(-u -b "${2}M" -l 1372)
	ip netns exec "$NS_PREFIX${topo}b" iperf3 -s -1 -B "$OVERLAY_B" -p 5201 \
		>"$WORKDIR/iperf-$topo.srv" 2>&1 &
	srv_pid=$!
	PIDS+=("$srv_pid")
	for ((i = 0; i < 50; i++)); do
		[[ -n "$(nsx "${topo}b" ss -Hltn "sport = :5201")" ]] && break
		sleep 0.1
	done
	# The third party of the path: coturn, or the device that relays on the peer topology.
	local third=$TURN_PID third_ns=srv third_name=coturn
	if [[ $topo == peer ]]; then third=$RELAY_PID third_ns=peerrelay third_name="relaying device"; fi
	for pid in "${DAEMON_PIDS[0]}" "${DAEMON_PIDS[1]}" "$third"; do before+=("$(cpu_ticks "$pid")"); done
	drops0=$(rcvbuf_drops "$third_ns")
	t0=$EPOCHREALTIME
	out=$(nsx "${topo}a" timeout $((IPERF_SECONDS + 30)) \
		iperf3 -c "$OVERLAY_B" -p 5201 -t "$IPERF_SECONDS" "${udp[@]}" -J 2>/dev/null || true)
	for pid in "${DAEMON_PIDS[0]}" "${DAEMON_PIDS[1]}" "$third"; do after+=("$(cpu_ticks "$pid")"); done
	CPU[$key]=$(awk -v t0="$t0" -v t1="$EPOCHREALTIME" -v hz="$(getconf CLK_TCK)" \
		-v a="$((after[0] - before[0]))" -v b="$((after[1] - before[1]))" -v c="$((after[2] - before[2]))" \
		-v n="$third_name" \
		'BEGIN { s = (t1 - t0) * hz / 100; printf "a %.0f%%, b %.0f%%, %s %.0f%%", a / s, b / s, n, c / s }')
	DROPS[$key]=$(($(rcvbuf_drops "$third_ns") - drops0))
	stop_pids "$srv_pid"
	IPERF_MBPS=$(jq -r '.end.sum_received.bits_per_second // empty | . / 1e6 | . * 10 | round / 10' \
		<<<"$out" 2>/dev/null || true)
}

median() {
	printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
		if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# ---------------------------------------------------------------- measurements

for topo in $TOPOLOGIES; do
	samples=()
	totals=()
	for ((run = 1; run <= RUNS; run++)); do
		one_run "$topo" "$run"
		samples+=("$RUN_DT")
		totals+=("$RUN_TOTAL")
		path=$(peer_path "$topo")
		PATHS[$topo]=$path
		log "$topo run $run/$RUNS: ${RUN_DT}s from both online to the first reply (${RUN_TOTAL}s from start; path: $path)"
		if ((run == RUNS)) && [[ "$topo" != lan ]]; then
			log "$topo: iperf3, 1 stream, ${IPERF_SECONDS}s over the $path link"
			iperf "$topo"
			THROUGHPUT[$topo]=$IPERF_MBPS
			log "$topo: ${IPERF_MBPS:-?} Mbit/s"
			if [[ -n "$UDP_MBIT" ]]; then
				log "$topo: iperf3, UDP at $UDP_MBIT Mbit/s, ${IPERF_SECONDS}s over the $path link"
				iperf "$topo" "$UDP_MBIT"
				THROUGHPUT_UDP[$topo]=$IPERF_MBPS
				log "$topo: ${IPERF_MBPS:-?} Mbit/s received"
			fi
		fi
		stop_daemons
	done
	MEDIAN[$topo]=$(median "${samples[@]}")
	MIN[$topo]=$(printf '%s\n' "${samples[@]}" | sort -g | head -n 1)
	MAX[$topo]=$(printf '%s\n' "${samples[@]}" | sort -g | tail -n 1)
	SAMPLES[$topo]="${samples[*]}"
	FROM_START[$topo]=$(median "${totals[@]}")
done

# ---------------------------------------------------------------- report

echo
echo "ipop link set-up time: both devices online -> first ping reply over the overlay"
echo "(median of $RUNS runs; \"from start\": median from starting both daemons to that reply;"
echo " $(nproc) CPUs; $("$IPOP" --version 2>/dev/null || echo ipop))"
echo
printf '%-8s %-20s %8s %8s %8s %8s %-4s %11s  %s\n' topology path median min max target ok "from start" samples
for topo in $TOPOLOGIES; do
	ok=$(awk -v m="${MEDIAN[$topo]}" -v t="${TARGET[$topo]}" 'BEGIN { print (m <= t) ? "yes" : "NO" }')
	case $topo in
	lan) kind="no NAT" ;;
	cone) kind="cone NATs" ;;
	relay) kind="symm. NATs" ;;
	mapped) kind="symm. NATs" ;;
	peer) kind="symm., friend" ;;
	esac
	printf '%-8s %-20s %7ss %7ss %7ss %6s s %-4s %10ss  %s\n' "$topo" "${PATHS[$topo]} ($kind)" \
		"${MEDIAN[$topo]}" "${MIN[$topo]}" "${MAX[$topo]}" "<= ${TARGET[$topo]}" "$ok" \
		"${FROM_START[$topo]}" "${SAMPLES[$topo]}"
done
echo
direct=${THROUGHPUT[cone]:-}
relayed=${THROUGHPUT[relay]:-}
mapped=${THROUGHPUT[mapped]:-}
peer=${THROUGHPUT[peer]:-}
echo "iperf3 TCP throughput, 1 stream, ${IPERF_SECONDS} s (device a -> device b over the overlay)"
printf '  %-26s %10s Mbit/s   CPU (%% of a core): %s\n' "direct (cone NATs):" "${direct:-n/a}" "${CPU[cone]:-n/a}"
printf '  %-26s %10s Mbit/s   CPU (%% of a core): %s; coturn dropped %s datagrams (receive buffers full)\n' \
	"relayed (symmetric NATs):" "${relayed:-n/a}" "${CPU[relay]:-n/a}" "${DROPS[relay]:-n/a}"
printf '  %-26s %10s Mbit/s   CPU (%% of a core): %s\n' "mapped (symmetric NATs):" "${mapped:-n/a}" "${CPU[mapped]:-n/a}"
if [[ -n "$direct" && -n "$relayed" ]]; then
	awk -v d="$direct" -v r="$relayed" 'BEGIN {
		if (d > 0) printf "  %-26s %10.2f\n", "relayed / direct:", r / d }'
fi
printf '  %-26s %10s Mbit/s   CPU (%% of a core): %s; the relaying device dropped %s datagrams (receive buffers full)\n' \
	"peer-relayed (symm. NATs):" "${peer:-n/a}" "${CPU[peer]:-n/a}" "${DROPS[peer]:-n/a}"
if [[ -n "$direct" && -n "$peer" ]]; then
	awk -v d="$direct" -v p="$peer" 'BEGIN {
		if (d > 0) printf "  %-26s %10.2f\n", "peer-relayed / direct:", p / d }'
fi
if [[ -n "$direct" && -n "$mapped" ]]; then
	awk -v d="$direct" -v m="$mapped" 'BEGIN {
		if (d > 0) printf "  %-26s %10.2f\n", "mapped / direct:", m / d }'
fi
if [[ -n "$UDP_MBIT" ]]; then
	echo
	echo "iperf3 UDP, $UDP_MBIT Mbit/s offered, ${IPERF_SECONDS} s (device a -> device b over the overlay): Mbit/s received"
	for topo in cone relay mapped peer; do
		[[ -n "${THROUGHPUT_UDP[$topo]:-}" ]] || continue
		third=coturn
		[[ $topo == peer ]] && third="the relaying device"
		printf '  %-8s %-20s %10s Mbit/s   CPU (%% of a core): %s; %s dropped %s datagrams\n' "$topo" \
			"${PATHS[$topo]}" "${THROUGHPUT_UDP[$topo]}" "${CPU[$topo-udp]}" "$third" "${DROPS[$topo-udp]}"
		if [[ $topo != cone && -n "${THROUGHPUT_UDP[cone]:-}" ]]; then
			awk -v d="${THROUGHPUT_UDP[cone]}" -v r="${THROUGHPUT_UDP[$topo]}" 'BEGIN {
				if (d > 0) printf "  %-29s %10.2f\n", "over direct:", r / d }'
		fi
	done
fi

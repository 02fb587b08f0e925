#!/usr/bin/env bash
# ipop demo: two devices in their own network namespaces, joined by a virtual Ethernet link,
# run `ipop up` with each other as static peers and ping each other over the encrypted overlay.
#
# Usage (as root): scripts/demo.sh [--keep]
#   --keep   leave the devices running and print how to explore and how to stop them
set -euo pipefail

keep=0
[[ "${1:-}" == "--keep" ]] && keep=1
[[ $EUID -eq 0 ]] || { echo "demo: run as root (it creates network namespaces and TUN devices)" >&2; exit 1; }

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tag="ipopdemo$$"
ns_a="${tag}-alice"
ns_b="${tag}-bob"
work=$(mktemp -d /tmp/ipop-demo.XXXXXX)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$ns_a" 2>/dev/null || true
  ip netns del "$ns_b" 2>/dev/null || true
  rm -rf "$work"
}

step "installing missing Debian packages"
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
if ((${#need[@]})); then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

step "building ipop (release)"
cargo build --release --quiet -p ipop --manifest-path "$root/Cargo.toml"
ipop="$root/target/release/ipop"

trap cleanup EXIT
step "creating two devices, alice and bob, on a virtual LAN (10.0.0.0/24)"
ip netns add "$ns_a"
ip netns add "$ns_b"
ip link add "v${$}a" netns "$ns_a" type veth peer name "v${$}b" netns "$ns_b"
ip -n "$ns_a" addr add 10.0.0.1/24 dev "v${$}a"
ip -n "$ns_b" addr add 10.0.0.2/24 dev "v${$}b"
ip -n "$ns_a" link set lo up
ip -n "$ns_b" link set lo up
ip -n "$ns_a" link set "v${$}a" up
ip -n "$ns_b" link set "v${$}b" up

step "ipop init on each device (config + private key)"
for who in alice bob; do
  "$ipop" init "$work/$who/ipop.toml" >/dev/null
done
key_a=$("$ipop" key -c "$work/alice/ipop.toml" | head -n1)
key_b=$("$ipop" key -c "$work/bob/ipop.toml" | head -n1)

write_config() { # who overlay-address peer-name peer-key peer-endpoint peer-address
  cat >"$work/$1/ipop.toml" <<CONF
[device]
log_level = "info"
control_socket = "$work/$1/ipop.sock"

[interface]
name = "ipop0"
addresses = ["$2/24", "fd77::${2##*.}/64"]
listen_port = 51820

[[peers]]
name = "$3"
public_key = "$4"
endpoint = "$5:51820"
addresses = ["$6/32", "fd77::${6##*.}/128"]
CONF
}
write_config alice 10.77.0.1 bob "$key_b" 10.0.0.2 10.77.0.2
write_config bob 10.77.0.2 alice "$key_a" 10.0.0.1 10.77.0.1

step "ipop up on alice and bob"
ip netns exec "$ns_a" "$ipop" up -c "$work/alice/ipop.toml" 2>"$work/alice/log" &
pids+=($!)
ip netns exec "$ns_b" "$ipop" up -c "$work/bob/ipop.toml" 2>"$work/bob/log" &
pids+=($!)

step "waiting for the tunnel"
for _ in $(seq 50); do
  if ip netns exec "$ns_a" "$ipop" status --json -c "$work/alice/ipop.toml" 2>/dev/null | grep -q '"state":"connected"'; then
    break
  fi
  sleep 0.1
done

step "alice pings bob over the overlay (IPv4 and IPv6)"
ip netns exec "$ns_a" ping -c 3 -i 0.2 -W 2 10.77.0.2
ip netns exec "$ns_a" ping -6 -c 3 -i 0.2 -W 2 fd77::2

step "ipop status on alice"
ip netns exec "$ns_a" "$ipop" status -c "$work/alice/ipop.toml"

if ((keep)); then
  trap - EXIT
  cat <<MSG

The devices keep running. Explore:
  ip netns exec $ns_a ping 10.77.0.2
  ip netns exec $ns_b $ipop status -c $work/bob/ipop.toml
  less $work/alice/log
Stop everything:
  kill ${pids[*]}; ip netns del $ns_a; ip netns del $ns_b; rm -rf $work
MSG
else
  step "stopping and cleaning up"
fi

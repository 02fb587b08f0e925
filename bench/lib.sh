# shellcheck shell=bash
# bench/lib.sh - what the benchmark scripts share; sourced by them, not run.
#
#   BENCH_NAME=flood
#   # shellcheck source=bench/lib.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# The script sets BENCH_NAME, the tag of its log lines, before sourcing. It then has REPO (the
# repository's root), log, die, is_alive, stop_pids, fg_run (with FG_PID), stale,
# ensure_release_binaries and ensure_packages.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The process fg_run waits for, if any: the script's cleanup stops it.
FG_PID=""

log() { printf '[%s %s] %s\n' "$BENCH_NAME" "$(date +%H:%M:%S)" "$*" >&2; }
die() {
	log "ERROR: $*"
	exit 1
}

is_alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

# stop_pids PID...: SIGTERM to each (empty arguments are skipped), up to 5 s to exit, then
# SIGKILL; reaps those that are this shell's children.
stop_pids() {
	local pid i alive
	for pid in "$@"; do
		if is_alive "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
	done
	for ((i = 0; i < 50; i++)); do
		alive=0
		for pid in "$@"; do
			if is_alive "$pid"; then alive=1; fi
		done
		((alive)) || break
		sleep 0.1
	done
	for pid in "$@"; do
		if is_alive "$pid"; then
			log "pid $pid did not stop on SIGTERM within 5 s; sending SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	done
	for pid in "$@"; do
		wait "$pid" 2>/dev/null || true
	done
	return 0
}

# fg_run OUT ERR CMD...: runs CMD with stdout to OUT and stderr to ERR in the background and
# waits for it, so that INT/TERM traps fire at once rather than when CMD ends. (Redirect
# inside, not on the fg_run call: a trap firing while it runs would log into those files.)
fg_run() {
	local rc=0 out=$1 err=$2
	shift 2
	"$@" >"$out" 2>"$err" &
	FG_PID=$!
	wait "$FG_PID" || rc=$?
	FG_PID=""
	return "$rc"
}

# stale BIN: prints why BIN must be (re)built (`missing`, or a newer source file), or nothing.
stale() {
	if [[ ! -x "$1" ]]; then
		echo "missing"
		return 0
	fi
	find "$REPO/crates" "$REPO/Cargo.toml" "$REPO/Cargo.lock" -newer "$1" \
		\( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -print -quit 2>/dev/null || true
}

# ensure_release_binaries PACKAGE:BIN...: for each binary BIN of cargo package PACKAGE, the
# variable named after it (ipop: IPOP_BIN, ipop-scale: IPOP_SCALE_BIN) keeps a path set in
# the environment, or else becomes target/release/BIN; those are (re)built, in one
# `cargo build --release`, when one is missing or older than the sources.
ensure_release_binaries() {
	local want package bin var reason
	local -a bins=() vars=() why=() build=()
	for want in "$@"; do
		package=${want%%:*}
		bin=${want#*:}
		var=${bin^^}
		var=${var//-/_}_BIN
		bins+=("$bin")
		vars+=("$var")
		[[ -n "${!var:-}" ]] && continue
		printf -v "$var" '%s' "$REPO/target/release/$bin"
		build+=(-p "$package" --bin "$bin")
		reason=$(stale "${!var}")
		[[ -n "$reason" ]] && why+=("$bin ${reason/#$REPO\//older than }")
	done
	if ((${#why[@]})); then
		log "building ${bins[*]} (release): ${why[*]}"
		(cd "$REPO" && cargo build --release "${build[@]}" >&2) ||
			die "cargo build --release failed; set ${vars[*]} to use existing binaries"
	fi
	local i found=""
	for i in "${!vars[@]}"; do
		var=${vars[i]}
		[[ -x "${!var}" ]] || die "$var=${!var} is not executable"
		found+="${found:+; }${bins[i]}: ${!var}"
	done
	log "$found"
}

# ensure_packages [--with-recommends] COMMAND:PACKAGE...: installs the Debian PACKAGE of each
# COMMAND that is not on the PATH, without the packages they recommend unless told; runs
# `apt-get update` and tries again when the first install fails.
ensure_packages() {
	local -a options=(--no-install-recommends) missing=()
	if [[ "${1:-}" == --with-recommends ]]; then
		options=()
		shift
	fi
	local want
	for want in "$@"; do
		command -v "${want%%:*}" >/dev/null || missing+=("${want#*:}")
	done
	((${#missing[@]} == 0)) && return 0
	log "installing Debian packages: ${missing[*]}"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${options[@]}" "${missing[@]}" >&2; then
		log "apt-get install failed; running apt-get update and retrying"
		apt-get update -q >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${options[@]}" "${missing[@]}" >&2
	fi
}

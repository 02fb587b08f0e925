#!/usr/bin/env bash
# Builds ipop's Debian package into target/debian/: the binary, the systemd unit, a default
# config, the manual pages and the shell completions (both generated from the CLI).
#
#   dist/deb.sh                  a release build (what to install)
#   dist/deb.sh --profile dev    the debug build, quicker (what the tests install)
#   dist/deb.sh ... --no-build   package the binary already built for that profile
#
# Other arguments go to cargo deb (`--output FILE`, say). Needs cargo-deb:
# cargo install cargo-deb --locked
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
build=1
args=()
while (($#)); do
  case $1 in
    --profile) profile=${2:?"--profile needs a profile name"}; shift 2 ;;
    --no-build) build=0; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
command -v cargo-deb >/dev/null ||
  { echo "deb: cargo-deb is missing; install it with: cargo install cargo-deb --locked" >&2; exit 1; }

case $profile in
  dev) out=debug ;;
  *) out=$profile ;;
esac
target=${CARGO_TARGET_DIR:-target}
((build)) && cargo build --quiet --profile "$profile" -p ipop
bin=$target/$out/ipop
[[ -x $bin ]] || { echo "deb: $bin is missing; build it first or leave out --no-build" >&2; exit 1; }

dist=$target/$out/dist
rm -rf "$dist"
mkdir -p "$dist/man" "$dist/completions"
"$bin" man "$dist/man"
gzip -9n "$dist/man/"*.1
"$bin" completions bash >"$dist/completions/ipop.bash"
"$bin" completions zsh >"$dist/completions/_ipop"
"$bin" completions fish >"$dist/completions/ipop.fish"

cargo deb --package ipop --no-build --profile "$profile" --fast "${args[@]}"

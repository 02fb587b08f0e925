//! The Debian package: `dist/deb.sh` builds it from the binary under test, and it installs in a
//! clean root, a private mount namespace whose `/` is an overlay over the host's with its
//! changes in memory, so nothing reaches the host. There `ipop --version` runs, systemd accepts
//! the unit, the `ipop` user and the state directory exist with the modes the unit expects, the
//! manual pages and completions are in place, and the default config starts nothing.
//!
//! Run as root, with cargo-deb installed (`scripts/test.sh` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ipop");

/// Installs the package at `$1` in a clean root and prints what a user would check, one
/// `== WHAT` header per step; a failing step stops the script.
const INSTALL: &str = r#"
set -euo pipefail
deb=$1 scratch=$2
mount -t tmpfs tmpfs "$scratch"
mkdir "$scratch/upper" "$scratch/work" "$scratch/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/root"
root=$scratch/root
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
cp "$deb" "$root/tmp/ipop.deb"
in_root() { chroot "$root" "$@"; }
echo "== dpkg"
in_root dpkg -i /tmp/ipop.deb
echo "== version"
in_root ipop --version
echo "== verify"
in_root systemd-analyze verify /usr/lib/systemd/system/ipop.service 2>&1
echo "== user"
in_root getent passwd ipop
echo "== modes"
in_root stat -c '%U:%G %a %n' /var/lib/ipop /etc/ipop /etc/ipop/ipop.toml
echo "== files"
for f in /usr/share/man/man1/ipop.1.gz /usr/share/man/man1/ipop-init.1.gz \
    /usr/share/bash-completion/completions/ipop /usr/share/zsh/vendor-completions/_ipop \
    /usr/share/fish/vendor_completions.d/ipop.fish; do
  test -s "$root$f" && echo "$f"
done
echo "== conffiles"
in_root dpkg-query -W -f='${Conffiles}\n' ipop
echo "== up"
in_root ipop up -c /etc/ipop/ipop.toml 2>&1 && echo "started" || echo "refused"
"#;

/// The target directory the binary under test was built in (`.../target/debug/ipop`).
fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the binary sits in TARGET/debug")
        .to_owned()
}

/// The lines under `== what` in the script's output.
fn section<'a>(out: &'a str, what: &str) -> Vec<&'a str> {
    out.lines()
        .skip_while(|l| *l != format!("== {what}"))
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

#[test]
fn the_package_installs_in_a_clean_root_with_its_user_unit_and_pages() {
    let host_had_user = host_has_user();
    let dir = ipop_lab::TestDir::new("deb");
    let deb = dir.path().join("ipop.deb");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let built = Command::new(repo.join("dist/deb.sh"))
        .args(["--profile", "dev", "--no-build", "--output"])
        .arg(&deb)
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("run dist/deb.sh");
    assert!(
        built.status.success() && deb.exists(),
        "dist/deb.sh failed ({}; cargo-deb comes from `cargo install cargo-deb --locked`):\n{}",
        built.status,
        String::from_utf8_lossy(&built.stderr)
    );

    let scratch = dir.path().join("root");
    std::fs::create_dir(&scratch).expect("scratch directory");
    let run = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            INSTALL,
            "install",
        ])
        .arg(&deb)
        .arg(&scratch)
        .output()
        .expect("run unshare");
    let out = String::from_utf8_lossy(&run.stdout);
    let why = format!(
        "{}\nstdout:\n{out}\nstderr:\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "installing the package: {why}");

    assert_eq!(
        section(&out, "version"),
        [format!("ipop {}", env!("CARGO_PKG_VERSION"))],
        "{why}"
    );
    assert_eq!(
        section(&out, "verify"),
        Vec::<&str>::new(),
        "systemd-analyze verify complains: {why}"
    );
    let user = section(&out, "user");
    assert!(
        user.len() == 1
            && user[0].starts_with("ipop:x:")
            && user[0].ends_with(":/var/lib/ipop:/usr/sbin/nologin"),
        "the ipop user: {why}"
    );
    assert_eq!(
        section(&out, "modes"),
        [
            "ipop:ipop 700 /var/lib/ipop",
            "root:ipop 750 /etc/ipop",
            "root:ipop 640 /etc/ipop/ipop.toml"
        ],
        "{why}"
    );
    assert_eq!(
        section(&out, "files").len(),
        5,
        "pages and completions: {why}"
    );
    assert!(
        section(&out, "conffiles")
            .iter()
            .any(|l| l.trim().starts_with("/etc/ipop/ipop.toml ")),
        "the default config is a conffile: {why}"
    );
    let up = section(&out, "up");
    assert!(
        up.last() == Some(&"refused") && up.iter().any(|l| l.contains("no overlay")),
        "the default config must link nothing: {why}"
    );

    if !host_had_user {
        assert!(
            !host_has_user(),
            "installing in the clean root added the ipop user to the host"
        );
    }
}

fn host_has_user() -> bool {
    Command::new("getent")
        .args(["passwd", "ipop"])
        .status()
        .expect("run getent")
        .success()
}

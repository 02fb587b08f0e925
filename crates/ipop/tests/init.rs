//! `ipop init` as a user runs it, without a terminal: the password on standard input, the
//! files it writes and their modes, a config that `ipop up`'s own loader accepts, the refusal to
//! overwrite, and `ipop up` and `ipop key` refusing secrets that other users can read.
//!
//! Nothing here needs root or a network: `ipop up` must stop at the secrets' modes, before it
//! sets anything up.

use ipop::config::Config;
use ipop_lab::TestDir;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_ipop");
const PASSWORD: &str = "correct horse \"battery\" staple";

/// Runs `ipop ARGS` with `stdin` as its standard input (none when `None`).
fn ipop(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ipop");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // ipop may end before it reads its input (a refused argument): a closed pipe then is
        // no failure of the test, what ipop said is checked.
        match pipe.write_all(text.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
            _ => {}
        }
    }
    child.wait_with_output().expect("wait for ipop")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

#[test]
fn init_writes_an_xmpp_config_that_up_loads_with_private_secrets() {
    let dir = TestDir::new("init-xmpp");
    let config = dir.path().join("etc").join("ipop.toml");
    let key = dir.path().join("etc").join("ipop.key");
    let pass = dir.path().join("etc").join("xmpp.pass");
    let config_arg = config.to_str().expect("UTF-8 path");
    let init = [
        "init",
        config_arg,
        "--jid",
        "carol@example.org",
        "--social",
        "--group",
        "lab@conference.example.org",
        "--subnet",
        "10.79.0.0/24",
        "--create",
        "--device",
        "desk",
        "--server",
        "127.0.0.1:5222",
    ];
    let out = ipop(&init, Some(&format!("{PASSWORD}\n")));
    assert!(out.status.success(), "ipop init: {}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("wrote {}", config.display())) && stdout.contains("fingerprint"),
        "{stdout}"
    );
    assert_eq!(mode(&key), 0o600, "the key's mode");
    assert_eq!(mode(&pass), 0o600, "the password file's mode");
    assert_eq!(
        std::fs::read_to_string(&pass).expect("password file"),
        format!("{PASSWORD}\n")
    );

    // The config loads with the loader `ipop up` uses, with every flag in it.
    let c = Config::load(&config).expect("the written config loads");
    c.check_secret_files().expect("the secrets are private");
    let x = c.xmpp.as_ref().expect("[xmpp]");
    assert_eq!(x.jid, "carol@example.org");
    assert_eq!(x.device.as_deref(), Some("desk"));
    assert_eq!(x.server.as_deref(), Some("127.0.0.1:5222"));
    assert_eq!(c.xmpp_password(x).expect("the password"), PASSWORD);
    assert_eq!(c.key_path(), key);
    assert!(c.social.as_ref().is_some_and(|s| s.enabled));
    assert_eq!(c.groups.len(), 1);
    assert_eq!(c.groups[0].room, "lab@conference.example.org");
    assert_eq!(c.groups[0].subnet.to_string(), "10.79.0.0/24");
    assert!(c.groups[0].create);
    let public = ipop(&["key", "-c", config_arg], None);
    assert!(public.status.success(), "ipop key: {}", stderr(&public));
    assert!(
        stdout.contains(
            String::from_utf8_lossy(&public.stdout)
                .lines()
                .next()
                .unwrap_or("?")
        ),
        "ipop init and ipop key print the same public key"
    );

    // Existing files are not overwritten without --force; nothing is asked for first.
    let out = ipop(&init, None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("{} exists; use --force", config.display())),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(&config).expect("remove the config");
    std::fs::remove_file(&key).expect("remove the key");
    let out = ipop(&init, None);
    assert!(
        stderr(&out).contains(&format!("{} exists; use --force", pass.display())),
        "{}",
        stderr(&out)
    );
    assert!(
        !config.exists() && !key.exists(),
        "a refused init writes nothing"
    );

    // --force rewrites them, and secrets that had been opened up are private again.
    std::fs::write(&key, "old\n").expect("write a key");
    chmod(&key, 0o644);
    chmod(&pass, 0o644);
    let mut forced = init.to_vec();
    forced.push("--force");
    let out = ipop(&forced, Some("new password\n"));
    assert!(out.status.success(), "ipop init --force: {}", stderr(&out));
    assert_eq!((mode(&key), mode(&pass)), (0o600, 0o600));
    assert_eq!(
        std::fs::read_to_string(&pass).expect("password file"),
        "new password\n"
    );
    assert!(Config::load(&config).is_ok());

    // `ipop up` refuses a password file that others can read, before it sets anything up.
    chmod(&pass, 0o644);
    let out = ipop(&["up", "-c", config_arg], None);
    assert!(
        !out.status.success(),
        "ipop up ran with an open password file"
    );
    let e = stderr(&out);
    assert!(
        e.contains(&format!("[xmpp] password_file {}", pass.display()))
            && e.contains("mode 0644")
            && e.contains(&format!("`chmod 600 {}`", pass.display())),
        "{e}"
    );

    // And a private key that its group can read, as `ipop key` does.
    chmod(&pass, 0o600);
    chmod(&key, 0o640);
    for command in ["up", "key"] {
        let out = ipop(&[command, "-c", config_arg], None);
        assert!(!out.status.success(), "ipop {command} read an open key");
        let e = stderr(&out);
        assert!(
            e.contains(&format!("private key file {}", key.display()))
                && e.contains("mode 0640")
                && e.contains(&format!("`chmod 600 {}`", key.display())),
            "ipop {command}: {e}"
        );
    }
}

#[test]
fn init_without_a_terminal_needs_jid_and_a_password() {
    let dir = TestDir::new("init-noterm");
    let config = dir.path().join("ipop.toml");
    let config_arg = config.to_str().expect("UTF-8 path");

    let out = ipop(&["init", config_arg], None);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("--jid") && e.contains("--static"), "{e}");

    let out = ipop(&["init", config_arg, "--jid", "alice@example.org"], None);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no password for alice@example.org"),
        "{}",
        stderr(&out)
    );

    let out = ipop(&["init", config_arg, "--jid", "alice"], Some("pw\n"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--jid"), "{}", stderr(&out));

    // A group subnet that overlaps the social overlay's is refused with the reason.
    let out = ipop(
        &[
            "init",
            config_arg,
            "--jid",
            "alice@example.org",
            "--social",
            "--group",
            "lab@conference.example.org",
            "--subnet",
            "172.31.4.0/24",
        ],
        Some("pw\n"),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("overlaps [social]"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("list").count(),
        0,
        "refused inits write nothing"
    );
}

#[test]
fn init_static_writes_the_static_peers_config() {
    let dir = TestDir::new("init-static");
    let config = dir.path().join("ipop.toml");
    let config_arg = config.to_str().expect("UTF-8 path");
    let out = ipop(&["init", "--static", config_arg], None);
    assert!(out.status.success(), "ipop init --static: {}", stderr(&out));
    assert!(!dir.path().join("xmpp.pass").exists());
    assert_eq!(mode(&dir.path().join("ipop.key")), 0o600);
    let c = Config::load(&config).expect("the written config loads");
    assert!(c.xmpp.is_none() && !c.interface.addresses.is_empty());
    let out = ipop(&["init", "--static", config_arg], None);
    assert!(
        stderr(&out).contains("exists; use --force"),
        "{}",
        stderr(&out)
    );
    let out = ipop(&["init", "--static", "--force", config_arg], None);
    assert!(out.status.success(), "{}", stderr(&out));
}

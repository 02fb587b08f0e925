//! The systemd unit in `dist/`: systemd accepts it, and it runs `ipop up` as documented in
//! `docs/systemd.md` (an unprivileged user with two capabilities, a sandbox, the state and
//! runtime directories the daemon's defaults use).

use std::collections::BTreeMap;
use std::process::Command;

const UNIT: &str = include_str!("../../../dist/ipop.service");

/// Section → key → values, in order (a key may be given more than once).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not KEY=VALUE: {line}", n + 1));
        let section = section
            .as_ref()
            .unwrap_or_else(|| panic!("line {}: a key before any section", n + 1));
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    unit
}

/// The one value of `key` in `section`.
fn one<'a>(unit: &'a Unit, section: &str, key: &str) -> &'a str {
    match unit
        .get(section)
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
    {
        Some([value]) => value,
        other => panic!("[{section}] {key}: expected one value, found {other:?}"),
    }
}

#[test]
fn the_unit_runs_ipop_up_unprivileged_in_a_sandbox() {
    let unit = parse(UNIT);
    assert_eq!(
        unit.keys().map(String::as_str).collect::<Vec<_>>(),
        ["Install", "Service", "Unit"]
    );
    let expected = [
        ("Type", "simple"),
        // A bare name: systemd looks in /usr/local/bin (installed by hand), then /usr/bin (the
        // Debian package).
        ("ExecStart", "ipop up -c /etc/ipop/ipop.toml"),
        ("Restart", "on-failure"),
        ("RestartSec", "5"),
        ("User", "ipop"),
        ("Group", "ipop"),
        ("DynamicUser", "no"),
        ("NoNewPrivileges", "yes"),
        ("StateDirectory", "ipop"),
        ("RuntimeDirectory", "ipop"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "/dev/net/tun rw"),
    ];
    for (key, value) in expected {
        assert_eq!(one(&unit, "Service", key), value, "[Service] {key}");
    }
    let capabilities = |key| {
        let mut caps: Vec<&str> = one(&unit, "Service", key).split_whitespace().collect();
        caps.sort_unstable();
        caps
    };
    assert_eq!(
        capabilities("AmbientCapabilities"),
        ["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"]
    );
    assert_eq!(
        capabilities("CapabilityBoundingSet"),
        capabilities("AmbientCapabilities")
    );
    assert_eq!(one(&unit, "Install", "WantedBy"), "multi-user.target");
}

/// `systemd-analyze verify` knows every key and value, and checks that the program exists: the
/// unit is checked with `ExecStart` pointing at the `ipop` just built.
#[test]
fn systemd_accepts_the_unit() {
    let dir = ipop_lab::TestDir::new("unit");
    let unit = dir.path().join("ipop.service");
    let installed = "ExecStart=ipop ";
    assert!(UNIT.contains(installed));
    let built = format!("ExecStart={} ", env!("CARGO_BIN_EXE_ipop"));
    std::fs::write(&unit, UNIT.replace(installed, &built)).expect("write the unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (Debian package systemd): {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}: {}\n{stderr}",
        unit.display(),
        out.status
    );
}

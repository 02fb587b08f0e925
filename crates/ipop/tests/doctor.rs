//! End-to-end `ipop doctor`: a device behind a NAT router of the lab, Prosody and coturn on the
//! lab's server (coturn on both server addresses, so that the NAT's mapping can be told, and over
//! TLS with a certificate from the CA that signs Prosody's), and the verdicts
//! `ipop doctor --json` gives.
//!
//! Run as root: they create network namespaces, NAT rules and a TUN device.

use ipop_lab::{
    Coturn, ExternalService, Nat, NatLab, Netns, NetnsHosts, Prosody, SERVER_ALT_IP, SERVER_IP,
    Site, TestCa, TestDir,
};
use serde_json::Value;
use std::fs::Permissions;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ipop");
const DOMAIN: &str = "example.org";
const USER: &str = "alice";
const PASSWORD: &str = "pw-alice-secret";
/// The TURN server's name over TLS (its certificate's), known to the device's namespace.
const TURN_HOST: &str = "turn.example.org";
/// Longer than the doctor's own timeouts add up to in these tests.
const DOCTOR_TIMEOUT: Duration = Duration::from_secs(60);

/// Fields drop in order: the servers, then the lab, then the directory.
struct World {
    _hosts: NetnsHosts,
    coturn: Coturn,
    prosody: Prosody,
    lab: NatLab,
    dir: TestDir,
}

/// Where the device's STUN and TURN servers come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Servers {
    /// `[nat]` in the config, TURN over UDP, TCP and TLS with these credentials (good or not).
    Config { good_turn_password: bool },
    /// The XMPP server alone (XEP-0215): STUN on both server addresses, TURN over UDP and TCP.
    Xmpp,
}

impl World {
    /// One device behind `nat`, Prosody with one account, coturn listening on both of the
    /// server's addresses (relaying from the first) and over TLS as [`TURN_HOST`].
    fn new(tag: &str, nat: Nat, servers: Servers) -> World {
        let lab = NatLab::builder(tag).site(Site::new(nat)).build();
        let dir = TestDir::new(tag);
        // One CA for both servers: the config's `ca_file` covers XMPP and TURN over TLS.
        let ca = TestCa::new("ipop-lab test CA");
        let coturn = Coturn::builder()
            .in_netns(&lab.server.ns, IpAddr::V4(SERVER_IP))
            .alt_ip(IpAddr::V4(SERVER_ALT_IP))
            .tls(&ca, TURN_HOST)
            .dir(dir.path())
            .start();
        let hosts = NetnsHosts::new(
            &lab.devices[0].host.ns,
            &[(TURN_HOST, IpAddr::V4(SERVER_IP))],
        );
        let mut prosody = Prosody::builder(DOMAIN)
            .in_netns(&lab.server.ns, IpAddr::V4(SERVER_IP))
            .ca(&ca);
        if servers == Servers::Xmpp {
            let port = coturn.addr().port();
            let service = |kind: &str, transport: &str, host: IpAddr| ExternalService {
                kind: kind.to_owned(),
                transport: transport.to_owned(),
                host: host.to_string(),
                port,
                secret: (kind == "turn").then(|| coturn.secret().to_owned()),
                ttl: Some(3600),
            };
            prosody = prosody.external_services(vec![
                service("stun", "udp", IpAddr::V4(SERVER_IP)),
                service("stun", "udp", IpAddr::V4(SERVER_ALT_IP)),
                service("turn", "udp", IpAddr::V4(SERVER_IP)),
                service("turn", "tcp", IpAddr::V4(SERVER_IP)),
            ]);
        }
        let prosody = prosody.start();
        prosody.register(USER, PASSWORD);
        World {
            _hosts: hosts,
            coturn,
            prosody,
            lab,
            dir,
        }
    }

    fn ns(&self) -> &Netns {
        &self.lab.devices[0].host.ns
    }

    fn tls_addr(&self) -> SocketAddr {
        self.coturn.tls_addr().expect("coturn serves TLS")
    }

    /// Writes the device's config and returns its path.
    fn config(&self, xmpp_password: &str, servers: Servers) -> PathBuf {
        let nat = match servers {
            Servers::Xmpp => String::new(),
            Servers::Config { good_turn_password } => {
                let (username, mut password) =
                    self.coturn.credentials(USER, Duration::from_secs(3600));
                if !good_turn_password {
                    password = "not-the-password".to_owned();
                }
                let port = self.coturn.addr().port();
                let tls_port = self.tls_addr().port();
                let turn = |server: &str, transport: &str| {
                    format!(
                        "[[nat.turn]]\nserver = \"{server}\"\ntransport = \"{transport}\"\n\
                         username = \"{username}\"\npassword = \"{password}\"\n\n"
                    )
                };
                let plain = format!("{SERVER_IP}:{port}");
                format!(
                    "[nat]\nstun = [\"{SERVER_IP}:{port}\", \"{SERVER_ALT_IP}:{port}\"]\n\n{}{}{}",
                    turn(&plain, "udp"),
                    turn(&plain, "tcp"),
                    turn(&format!("{TURN_HOST}:{tls_port}"), "tls")
                )
            }
        };
        let text = format!(
            "[xmpp]\njid = \"{USER}@{DOMAIN}\"\npassword = \"{xmpp_password}\"\nserver = \"{xmpp}\"\n\
             ca_file = {ca:?}\ndevice = \"laptop\"\n\n\
             [social]\n\n{nat}",
            xmpp = self.prosody.c2s_addr(),
            ca = self.prosody.ca_cert_path(),
        );
        let path = self.dir.path().join("ipop.toml");
        std::fs::write(&path, text).expect("config written");
        // It holds passwords: readable by its owner only, or doctor warns.
        std::fs::set_permissions(&path, Permissions::from_mode(0o600))
            .expect("config made private");
        path
    }
}

/// What one `ipop doctor` run printed.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn checks(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_else(|| panic!("no JSON array of checks: {self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ipop doctor exited {}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `ipop doctor -c CONFIG [ARGS]` in `ns`, killing it if it takes longer than
/// [`DOCTOR_TIMEOUT`].
fn doctor(ns: &Netns, config: &Path, args: &[&str]) -> Run {
    let mut child = ns
        .command(BIN)
        .arg("doctor")
        .arg("-c")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ipop doctor");
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let deadline = Instant::now() + DOCTOR_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ipop doctor") {
            break status;
        }
        if Instant::now() > deadline {
            // Our own child, by its handle.
            let _ = child.kill();
            let status = child.wait().expect("reap ipop doctor");
            panic!(
                "ipop doctor did not finish within {DOCTOR_TIMEOUT:?} ({status}); stderr:\n{}",
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Reads a child's pipe to the end on a thread of its own.
fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            // A read error leaves what was read; the assertions then say what is missing.
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// The check named `name`, as `(verdict, detail)`.
fn check(run: &Run, name: &str) -> (String, String) {
    let checks = run.checks();
    let found = checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name:?}: {run}"));
    (
        found["verdict"].as_str().unwrap_or_default().to_owned(),
        found["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

fn assert_verdict(run: &Run, name: &str, verdict: &str, detail_has: &str) -> String {
    let (v, detail) = check(run, name);
    assert!(
        v == verdict && detail.contains(detail_has),
        "check {name:?}: expected {verdict} with {detail_has:?}, got {v}: {detail}\n{run}"
    );
    detail
}

/// The relayed address in a TURN check's detail is on the server.
fn assert_relayed_on_server(detail: &str, run: &Run) {
    let relayed: Option<SocketAddr> = detail
        .strip_prefix("relayed address ")
        .and_then(|rest| rest.split([',', ';']).next())
        .and_then(|a| a.parse().ok());
    assert_eq!(
        relayed.map(|a| a.ip()),
        Some(IpAddr::V4(SERVER_IP)),
        "relayed address in {detail:?}\n{run}"
    );
}

#[test]
fn behind_a_cone_nat_every_check_passes() {
    let servers = Servers::Config {
        good_turn_password: true,
    };
    let w = World::new("dcone", Nat::PortRestrictedCone, servers);
    let config = w.config(PASSWORD, servers);
    let run = doctor(w.ns(), &config, &["--json"]);
    assert!(run.status.success(), "{run}");
    let names: Vec<String> = run
        .checks()
        .iter()
        .map(|c| c["check"].as_str().unwrap_or_default().to_owned())
        .collect();
    let port = w.coturn.addr().port();
    let expected = [
        "config".to_owned(),
        "xmpp login".to_owned(),
        "xmpp servers".to_owned(),
        format!("stun {SERVER_IP}:{port}"),
        format!("stun {SERVER_ALT_IP}:{port}"),
        "nat mapping".to_owned(),
        "port mapping".to_owned(),
        format!("turn udp {SERVER_IP}:{port}"),
        format!("turn tcp {SERVER_IP}:{port}"),
        format!("turn tls {}", w.tls_addr()),
        "tun".to_owned(),
    ];
    assert_eq!(names, expected, "{run}");
    assert_verdict(&run, "xmpp login", "ok", &format!("{USER}@{DOMAIN}/laptop"));
    let router = w.lab.router_of(&w.lab.devices[0].name).public_ip();
    let mapped = assert_verdict(
        &run,
        &format!("stun {SERVER_IP}:{port}"),
        "ok",
        "behind NAT",
    );
    assert!(mapped.contains(&format!("{router}:")), "{mapped}\n{run}");
    assert_verdict(&run, "nat mapping", "ok", "endpoint-independent mapping");
    // The router runs no PCP, NAT-PMP or UPnP server: each protocol says why.
    let gateway = w.lab.router_of(&w.lab.devices[0].name).lan_ip();
    let refused = assert_verdict(
        &run,
        "port mapping",
        "warn",
        &format!("the gateway {gateway} maps no port: PCP: "),
    );
    assert!(
        refused.contains("; NAT-PMP: ") && refused.contains("; UPnP: "),
        "{refused}\n{run}"
    );
    let tls = w.tls_addr();
    for name in [
        format!("turn udp {SERVER_IP}:{port}"),
        format!("turn tcp {SERVER_IP}:{port}"),
        format!("turn tls {tls}"),
    ] {
        let detail = assert_verdict(&run, &name, "ok", "released");
        assert_relayed_on_server(&detail, &run);
    }
    assert_verdict(&run, "tun", "ok", "created and removed");
    // Nothing left behind: the doctor's session is gone and so is its TUN device.
    let links = w.ns().exec(&["ip", "-o", "link"]);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("ipopdr"),
        "{}",
        String::from_utf8_lossy(&links.stdout)
    );
}

#[test]
fn behind_a_symmetric_nat_the_mapping_is_address_dependent() {
    let mut w = World::new("dsym", Nat::Symmetric, Servers::Xmpp);
    let config = w.config(PASSWORD, Servers::Xmpp);
    // The router maps ports (miniupnpd): the doctor gets a test mapping and deletes it.
    let (stun, name) = (w.coturn.addr(), w.lab.devices[0].name.clone());
    let upnp = w.lab.router_of_mut(&name).miniupnpd(stun).start();
    let run = doctor(w.ns(), &config, &["--json"]);
    let router = w.lab.router_of(&name);
    let granted = assert_verdict(
        &run,
        "port mapping",
        "ok",
        &format!(
            "the gateway {} maps {}:",
            router.lan_ip(),
            router.public_ip()
        ),
    );
    assert!(
        granted.contains(" by PCP (a test mapping, deleted)"),
        "{granted}\n{run}"
    );
    assert_eq!(upnp.mappings(), [], "{}", upnp.rules());
    // A symmetric NAT is worth a warning, not a failure: the relay works.
    assert!(run.status.success(), "{run}");
    let port = w.coturn.addr().port();
    let offered = assert_verdict(&run, "xmpp servers", "ok", "turn tcp");
    assert!(
        offered.contains(&format!("stun udp {SERVER_ALT_IP}:{port}")),
        "{offered}\n{run}"
    );
    assert_verdict(
        &run,
        "nat mapping",
        "warn",
        "address-dependent mapping (symmetric NAT)",
    );
    let detail = assert_verdict(&run, &format!("turn udp {SERVER_IP}:{port}"), "ok", "");
    assert_relayed_on_server(&detail, &run);
}

#[test]
fn wrong_xmpp_password_and_wrong_turn_credentials_fail() {
    let servers = Servers::Config {
        good_turn_password: false,
    };
    let w = World::new("dwrong", Nat::None, servers);
    let config = w.config("not-the-password", servers);
    let run = doctor(w.ns(), &config, &["--json"]);
    assert!(!run.status.success(), "{run}");
    assert_verdict(&run, "xmpp login", "fail", "wrong password");
    let port = w.coturn.addr().port();
    let tls = w.tls_addr();
    for name in [
        format!("turn udp {SERVER_IP}:{port}"),
        format!("turn tcp {SERVER_IP}:{port}"),
        format!("turn tls {tls}"),
    ] {
        assert_verdict(
            &run,
            &name,
            "fail",
            "the TURN server refused the credentials (401)",
        );
    }
    // On the internet with its own address: STUN says so.
    assert_verdict(&run, &format!("stun {SERVER_IP}:{port}"), "ok", "no NAT");
    assert_verdict(&run, "nat mapping", "ok", "no NAT");
    assert_verdict(&run, "port mapping", "ok", "no IPv4 default gateway");

    // What a user reads: the verdicts with advice, and the count of failures.
    let human = doctor(w.ns(), &config, &[]);
    assert!(!human.status.success(), "{human}");
    assert!(
        human
            .stdout
            .contains(&format!("checking XMPP login as {USER}@{DOMAIN} …"))
            && human.stdout.contains("fail  xmpp login: ")
            && human
                .stdout
                .contains("advice: check [xmpp] jid and the password")
            && human.stderr.contains("4 of 10 checks failed"),
        "{human}"
    );
}

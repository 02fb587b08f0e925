//! Certificate login (SASL EXTERNAL): devices whose config holds a client certificate and its
//! key, and no password, log in to an ejabberd that asks for client certificates, and link. A
//! certificate from a CA the server does not trust, and a server that does not offer
//! certificate login (Prosody as the tests run it), end `ipop up` with the reason.
//!
//! Run as root: the tests create network namespaces and TUN devices.

use ipop_lab::{Ejabberd, Lab, Node, TestCa, XmppServer};
use std::fs::Permissions;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::Duration;

mod common;
use common::*;

/// A LAN of `devices` nodes and an ejabberd, signed by `ca`, that takes client certificates.
fn world(tag: &str, devices: u8, ca: &TestCa) -> World {
    let lab = Lab::new(BIN, tag, devices + 1);
    let host = &lab.nodes[usize::from(devices)].host;
    let server = Ejabberd::builder(DOMAIN)
        .in_netns(&host.ns, IpAddr::V4(host.ipv4))
        .ca(ca)
        .certificate_login()
        .start();
    World {
        lab,
        server: Box::new(server),
    }
}

/// Writes `node`'s config for `user`'s device `device`, logging in with a certificate for
/// the account that `ca` signed, in `client.crt` and `client.key` (mode 0600) next to it.
fn configure_with_certificate(
    node: &Node,
    server: &dyn XmppServer,
    ca: &TestCa,
    user: &str,
    device: &str,
    overlays: &str,
) {
    let dir = node.config_path();
    let dir = dir.parent().expect("the config's directory");
    let cert = ca.issue_client(&format!("{user}@{DOMAIN}"));
    let (cert_path, key_path) = (dir.join("client.crt"), dir.join("client.key"));
    std::fs::write(&cert_path, cert.cert_pem).expect("write the certificate");
    std::fs::write(&key_path, cert.key_pem).expect("write the key");
    std::fs::set_permissions(&key_path, Permissions::from_mode(0o600)).expect("chmod the key");
    let mut config = node.config(51820);
    config.addresses.clear();
    config.extra = format!(
        "[xmpp]\njid = \"{user}@{DOMAIN}\"\nclient_cert = \"client.crt\"\nclient_key = \"client.key\"\n\
         server = \"{addr}\"\nca_file = {ca:?}\ndevice = \"{device}\"\n\n{overlays}",
        addr = server.c2s_addr(),
        ca = server.ca_cert_path(),
    );
    node.write_config(&config);
}

/// `ipop up` on `node`, which must end by itself (a failed login) within 30 s.
fn up_fails(node: &Node) -> Output {
    node.ns()
        .command("timeout")
        .args(["30", BIN, "up", "-c"])
        .arg(node.config_path())
        .output()
        .expect("run ipop up")
}

#[test]
fn devices_log_in_with_certificates_and_link() {
    let ca = TestCa::new("ipop-lab test CA");
    let mut w = world("cert", 2, &ca);
    let mut alice = w.user("alice");
    let mut bob = w.user("bob");
    alice.befriend(&mut bob);
    drop((alice, bob));
    configure_with_certificate(
        &w.lab.nodes[0],
        &*w.server,
        &ca,
        "alice",
        "laptop",
        &social("10.78.0.1/16"),
    );
    configure_with_certificate(
        &w.lab.nodes[1],
        &*w.server,
        &ca,
        "bob",
        "phone",
        &social("10.78.0.2/16"),
    );
    w.node(0).start();
    w.node(1).start();
    xmpp_online(w.node(0));
    xmpp_online(w.node(1));
    wait_social_ping(
        &w.lab.nodes[0],
        "bob@example.org",
        Duration::from_secs(20),
        "alice's device to ping bob's, both logged in with certificates",
    );
    let status = w.lab.nodes[0].status().expect("alice's status");
    assert_eq!(
        status["xmpp"]["jid"].as_str(),
        Some("alice@example.org/laptop"),
        "{status}"
    );

    // A certificate for the same account from a CA the server does not trust.
    let stranger = TestCa::new("another CA");
    w.lab.nodes[1].stop();
    let node = &w.lab.nodes[1];
    configure_with_certificate(
        node,
        &*w.server,
        &stranger,
        "bob",
        "phone",
        &social("10.78.0.2/16"),
    );
    let out = up_fails(node);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("ipop up with a certificate from another CA: {stderr}");
    assert!(
        !out.status.success()
            && stderr.contains("refused the client certificate for bob@example.org"),
        "{}\n{stderr}",
        out.status
    );
    w.lab.stop_all();
}

#[test]
fn a_server_without_certificate_login_is_named() {
    let ca = TestCa::new("ipop-lab test CA");
    let w = World::new("certp", 1);
    configure_with_certificate(
        &w.lab.nodes[0],
        &*w.server,
        &ca,
        "alice",
        "laptop",
        &social("10.78.0.1/16"),
    );
    let out = up_fails(&w.lab.nodes[0]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("ipop up against Prosody: {stderr}");
    assert!(
        !out.status.success() && stderr.contains("does not offer certificate login (SASL EXTERNAL"),
        "{}\n{stderr}",
        out.status
    );
}

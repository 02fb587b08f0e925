//! `ipop doctor`: checks, one after the other, what a device needs for its links to come up,
//! and says for each check whether it is fine (ok), worth a look (warn) or broken (fail), with
//! advice. The config file; the XMPP login (as `ipop up` does it) and the STUN/TURN servers the
//! XMPP server offers (XEP-0215); a STUN Binding with every STUN server from one UDP socket; the
//! NAT's mapping behaviour from the addresses two servers saw; a TURN allocation on every TURN
//! server; the permission to create a TUN device.
//!
//! STUN and TURN go through the core's sans-IO clients ([`StunBinding`], [`TurnAllocation`],
//! [`StreamFramer`] over TCP and TLS), driven here by a small loop on tokio sockets; TCP and TLS
//! connections are opened as the daemon opens them, trusting what it trusts.

use crate::config::{self, Config};
use crate::streams::{TurnStream, open_stream};
use anyhow::bail;
use ipop_core::PublicKey;
use ipop_core::osn::{IceServer, IceServerKind, IceTransport, OsnEvent};
use ipop_core::stun::{BindingEvent, StunBinding};
use ipop_core::turn::{StreamFramer, TurnAllocation, TurnCredentials, TurnEvent};
use ipop_xmpp::LoginError;
use serde::Serialize;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::time::sleep_until;
use tokio_rustls::TlsConnector;

/// How long the XMPP server may take to say which STUN/TURN servers it offers.
const SERVICES_TIMEOUT: Duration = Duration::from_secs(5);
/// How long logging out may take.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a STUN server may take to answer (three transmissions).
const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TURN allocation may take, the connection (TCP, TLS) and the 401 exchange
/// included.
const TURN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the TURN server may take to confirm the release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);
/// Where the kernel's TUN driver is reached.
const TUN_DEVICE: &str = "/dev/net/tun";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        })
    }
}

/// The outcome of one check, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Check {
    check: String,
    verdict: Verdict,
    detail: String,
    advice: Option<String>,
}

impl Check {
    fn ok(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            advice: None,
        }
    }

    fn warn(
        check: impl Into<String>,
        detail: impl Into<String>,
        advice: impl Into<String>,
    ) -> Check {
        Check::advised(Verdict::Warn, check.into(), detail.into(), advice.into())
    }

    fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        advice: impl Into<String>,
    ) -> Check {
        Check::advised(Verdict::Fail, check.into(), detail.into(), advice.into())
    }

    fn advised(verdict: Verdict, check: String, detail: String, advice: String) -> Check {
        Check {
            check,
            verdict,
            detail,
            advice: Some(advice),
        }
    }
}

/// The checks so far. Progress and verdicts are printed as they come; with `--json` the
/// progress goes to stderr and the verdicts to stdout at the end, as one JSON array.
struct Report {
    json: bool,
    checks: Vec<Check>,
}

impl Report {
    fn say(&self, line: &str) {
        if self.json {
            eprintln!("{line}");
        } else {
            // Nothing sensible can be done when stdout fails; the exit status still tells.
            let _ = crate::print_out(&format!("{line}\n"));
        }
    }

    fn start(&self, what: impl fmt::Display) {
        self.say(&format!("checking {what} …"));
    }

    fn add(&mut self, check: Check) {
        if !self.json {
            let mut text = format!("{:<5} {}: {}", check.verdict, check.check, check.detail);
            if let Some(advice) = &check.advice {
                text.push_str(&format!("\n      advice: {advice}"));
            }
            self.say(&text);
        }
        self.checks.push(check);
    }

    fn finish(self) -> anyhow::Result<()> {
        let count = |v: Verdict| self.checks.iter().filter(|c| c.verdict == v).count();
        let (failed, warned) = (count(Verdict::Fail), count(Verdict::Warn));
        if self.json {
            crate::print_out(&format!(
                "{}\n",
                serde_json::to_string_pretty(&self.checks)?
            ))?;
        } else {
            self.say(&format!(
                "{} checks: {} ok, {warned} warn, {failed} fail",
                self.checks.len(),
                self.checks.len() - warned - failed
            ));
        }
        if failed > 0 {
            bail!("{failed} of {} checks failed", self.checks.len());
        }
        Ok(())
    }
}

/// Runs every check against the config at `path`; fails when a check fails.
pub fn run(path: &Path, json: bool) -> anyhow::Result<()> {
    let mut report = Report {
        json,
        checks: Vec::new(),
    };
    report.start(format_args!("the config file {}", path.display()));
    let config = match Config::load(path).and_then(|c| private_secrets(&c).map(|()| c)) {
        Ok(config) => {
            report.add(Check::ok("config", format!("{} loads", path.display())));
            if let Some(warning) = config.open_inline_secrets(path) {
                report.add(Check::warn(
                    "config secrets",
                    warning,
                    "other users of this machine can read the password from the config file",
                ));
            }
            config
        }
        Err(e) => {
            let advice = if path.exists() {
                "fix what the message names (the line and the key, or the mode or path of a \
                 secret file: `ipop up` refuses it too); the other checks need it"
            } else {
                "write one with `ipop init`, or point -c (or IPOP_CONFIG) at yours"
            };
            report.add(Check::fail("config", format!("{e:#}"), advice));
            return report.finish();
        }
    };
    crate::runtime()?.block_on(checks(&config, &mut report));
    report.finish()
}

/// Refuses, as `ipop up` does, the files of secrets that other users can read. A missing one
/// is left to the checks that read it (the private key to `ipop up`).
fn private_secrets(config: &Config) -> anyhow::Result<()> {
    config
        .secret_files()
        .iter()
        .filter(|(_, path)| path.exists())
        .try_for_each(|(what, path)| config::check_private(path, what))
}

async fn checks(config: &Config, report: &mut Report) {
    let offered = xmpp(config, report).await;
    let mut servers: Vec<(IceServer, &'static str)> = match config.ice_servers() {
        Ok(list) => list.into_iter().map(|s| (s, "[nat]")).collect(),
        Err(e) => {
            report.start("the STUN/TURN servers of [nat]");
            report.add(Check::fail(
                "nat servers",
                format!("{e:#}"),
                "check the host names in [nat]; the servers of [nat] are not checked further",
            ));
            Vec::new()
        }
    };
    servers.extend(offered.into_iter().map(|s| (s, "XMPP server")));
    let answers = stun(config, &servers, report).await;
    mapping(&answers, report);
    port_mapping(config, report).await;
    // TURN servers over TLS are trusted as the daemon trusts them: the system's authorities
    // and the XMPP server's CA file.
    let ca_file = config
        .xmpp
        .as_ref()
        .and_then(|x| x.ca_file.as_ref())
        .map(|p| config.resolve(p));
    for (server, source) in servers
        .iter()
        .filter(|(s, _)| s.kind == IceServerKind::Turn)
    {
        turn(server, source, ca_file.as_deref(), report).await;
    }
    tun(report);
}

// ---- XMPP ----

/// Logs in as the daemon does, reports the STUN/TURN servers the XMPP server offers and
/// returns them.
///
/// The session uses the device name with `-doctor` appended, so that a daemon running on this
/// device keeps its own session. With the social overlay off and no room, its presence says
/// nothing about ipop, so nobody takes it for a peer (its key is a throwaway one all the same).
async fn xmpp(config: &Config, report: &mut Report) -> Vec<IceServer> {
    let Some(x) = &config.xmpp else {
        report.start("XMPP login");
        report.add(Check::ok(
            "xmpp login",
            "no [xmpp] account in the config: only static peers link (skipped)",
        ));
        return Vec::new();
    };
    report.start(format_args!("XMPP login as {}", x.jid));
    let throwaway = boringtun::x25519::StaticSecret::random_from_rng(rand_core::OsRng);
    let mut cfg = match crate::xmpp::settings(config, PublicKey::from_secret(&throwaway)) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => return Vec::new(),
        Err(e) => {
            report.add(Check::fail(
                "xmpp login",
                format!("{e:#}"),
                "fix the password source of [xmpp] that the message names (exactly one of \
                 password, password_file and password_command)",
            ));
            return Vec::new();
        }
    };
    cfg.device = format!("{}-doctor", cfg.device);
    cfg.social = false;
    cfg.groups.clear();
    let (session, mut events) = match ipop_xmpp::connect(cfg).await {
        Ok(connected) => connected,
        Err(e) => {
            report.add(Check::fail("xmpp login", e.to_string(), login_advice(&e)));
            return Vec::new();
        }
    };
    let status = session.status();
    report.add(Check::ok(
        "xmpp login",
        format!(
            "logged in as {} through {}",
            status.bound.as_deref().unwrap_or(&x.jid),
            status.server
        ),
    ));

    report.start("the STUN/TURN servers the XMPP server offers (XEP-0215)");
    let deadline = tokio::time::Instant::now() + SERVICES_TIMEOUT;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let offered: Result<Vec<IceServer>, String> = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(OsnEvent::IceServers(list)) => break Ok(list),
                Some(_) => {}
                None => break Err("the XMPP session ended".to_owned()),
            },
            _ = tick.tick() => {
                if let Some(problem) = session.status().external_services_problem {
                    break Err(problem);
                }
            }
            () = sleep_until(deadline) => {
                break Err(format!("no answer within {} s", SERVICES_TIMEOUT.as_secs()));
            }
        }
    };
    let own = !config.nat.stun.is_empty() || !config.nat.turn.is_empty();
    let offered = match offered {
        Ok(list) if !list.is_empty() => {
            let names: Vec<String> = list.iter().map(describe_server).collect();
            report.add(Check::ok("xmpp servers", names.join(", ")));
            list
        }
        Ok(_) => {
            report.add(services_missing(
                own,
                "the XMPP server offers none".to_owned(),
            ));
            Vec::new()
        }
        Err(why) => {
            report.add(services_missing(own, why));
            Vec::new()
        }
    };
    if tokio::time::timeout(LOGOUT_TIMEOUT, session.shutdown())
        .await
        .is_err()
    {
        report.say("(logging out of XMPP took too long; the server ends the session itself)");
    }
    offered
}

fn services_missing(own: bool, why: String) -> Check {
    if own {
        Check::ok(
            "xmpp servers",
            format!("none offered ({why}); the servers of [nat] are used"),
        )
    } else {
        Check::warn(
            "xmpp servers",
            format!("none offered ({why}), and [nat] names none"),
            "without STUN and TURN, only devices that reach each other directly link: add \
             servers to [nat], or ask the XMPP server's admin to offer them (Prosody: \
             mod_turn_external; ejabberd: mod_stun_disco)",
        )
    }
}

fn login_advice(e: &LoginError) -> String {
    match e {
        LoginError::AuthFailed { .. } => {
            "check [xmpp] jid and the password (password, password_file or password_command)"
        }
        LoginError::AccountDisabled { .. } => "ask the XMPP server's admin to enable the account",
        LoginError::Unreachable { .. } => {
            "check [xmpp] server (host:port) or the domain's DNS SRV records, and that no \
             firewall blocks TCP to the server"
        }
        LoginError::Certificate { .. } => {
            "for a private server, give its CA certificate with [xmpp] ca_file; check that \
             the server's name matches its certificate and that the clock is right"
        }
        LoginError::Tls { .. } | LoginError::NoTls { .. } => {
            "check [xmpp] tls: \"starttls\" on the client port (5222), \"direct\" on the \
             direct TLS port (5223)"
        }
        LoginError::NoScram { .. } => {
            "ask the XMPP server's admin to enable SCRAM authentication (hashed passwords)"
        }
        LoginError::NoExternal { .. } => {
            "ask the XMPP server's admin to accept client certificates (ejabberd: tls_verify \
             and c2s_cafile), or log in with a password instead of [xmpp] client_cert"
        }
        LoginError::CertificateRefused { .. } => {
            "check that [xmpp] client_cert is signed by a CA the server trusts and names this \
             account (id-on-xmppAddr), and that client_key is its key"
        }
        LoginError::Timeout { .. } | LoginError::Stream { .. } => {
            "check that [xmpp] server names an XMPP server and that the network lets the \
             connection through; try again"
        }
        LoginError::Config { .. } | LoginError::RoomRefused { .. } => "fix the [xmpp] section",
    }
    .to_owned()
}

fn transport_name(t: IceTransport) -> &'static str {
    match t {
        IceTransport::Udp => "udp",
        IceTransport::Tcp => "tcp",
        IceTransport::Tls => "tls",
    }
}

fn describe_server(s: &IceServer) -> String {
    let kind = match s.kind {
        IceServerKind::Stun => "stun",
        IceServerKind::Turn => "turn",
    };
    format!("{kind} {} {}", transport_name(s.transport), server_name(s))
}

/// `host (address)`, or the address alone when the host is one.
fn server_name(s: &IceServer) -> String {
    if s.host == s.address.ip().to_string() {
        s.address.to_string()
    } else {
        format!("{} ({})", s.host, s.address)
    }
}

// ---- STUN and the NAT's mapping ----

/// A STUN server that answered, and what it saw.
struct Answer {
    server: SocketAddr,
    mapped: SocketAddr,
    /// The mapped address is one of this device's own: no NAT on the way.
    local: bool,
}

/// A Binding with every STUN server (and every TURN server over UDP) from one UDP socket per
/// address family.
async fn stun(
    config: &Config,
    servers: &[(IceServer, &'static str)],
    report: &mut Report,
) -> Vec<Answer> {
    let mut targets: Vec<(SocketAddr, Vec<&str>)> = Vec::new();
    for (s, source) in servers {
        if s.transport != IceTransport::Udp {
            continue;
        }
        match targets.iter_mut().find(|(a, _)| *a == s.address) {
            Some((_, sources)) if !sources.contains(source) => sources.push(*source),
            Some(_) => {}
            None => targets.push((s.address, vec![*source])),
        }
    }
    if targets.is_empty() {
        report.start("STUN");
        report.add(Check::warn(
            "stun",
            "no STUN or TURN server over UDP to ask",
            "add a STUN server to [nat] stun: without one, devices behind NAT do not learn \
             their public address and link only through a relay",
        ));
        return Vec::new();
    }
    let own = crate::device::host_addresses(&config.interface.name);
    let mut sockets: [Option<UdpSocket>; 2] = [None, None];
    let mut answers = Vec::new();
    for (server, sources) in targets {
        report.start(format_args!(
            "STUN Binding with {server} (from {})",
            sources.join(" and ")
        ));
        let name = format!("stun {server}");
        let slot = &mut sockets[usize::from(server.is_ipv6())];
        if slot.is_none() {
            let any: IpAddr = if server.is_ipv6() {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            match UdpSocket::bind((any, 0)).await {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    report.add(Check::fail(
                        name,
                        format!("cannot open a UDP socket: {e}"),
                        "check that this machine has an address of that family",
                    ));
                    continue;
                }
            }
        }
        let Some(socket) = slot.as_ref() else {
            continue;
        };
        match stun_binding(socket, server).await {
            Ok(mapped) => {
                let local = own.contains(&mapped.ip().to_canonical());
                let port = socket.local_addr().map(|a| a.port()).unwrap_or_default();
                let how = if local {
                    "a local address: no NAT".to_owned()
                } else {
                    format!("behind NAT; local port {port}")
                };
                report.add(Check::ok(name, format!("mapped address {mapped} ({how})")));
                answers.push(Answer {
                    server,
                    mapped,
                    local,
                });
            }
            Err(reason) => report.add(Check::fail(
                name,
                reason,
                "the server is down or a firewall drops UDP to it: check its address and \
                 port; where UDP is blocked, links need a TURN server over TCP",
            )),
        }
    }
    answers
}

/// One Binding request (with retransmissions) to `server` from `socket`: the mapped address.
async fn stun_binding(socket: &UdpSocket, server: SocketAddr) -> Result<SocketAddr, String> {
    let start = Instant::now();
    let deadline = start + STUN_TIMEOUT;
    let mut binding = StunBinding::new(server, start, seed());
    let mut buf = vec![0u8; 2048];
    loop {
        while let Some((to, bytes)) = binding.poll_transmit() {
            socket
                .send_to(&bytes, to)
                .await
                .map_err(|e| format!("cannot send to {to}: {e}"))?;
        }
        if let Some(event) = binding.poll_event() {
            return match event {
                BindingEvent::Mapped(mapped) | BindingEvent::MappingChanged { to: mapped, .. } => {
                    Ok(mapped)
                }
                BindingEvent::Failed { reason } => Err(reason),
            };
        }
        let wake = binding.poll_timeout().map_or(deadline, |t| t.min(deadline));
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                let (n, from) = got.map_err(|e| format!("cannot receive: {e}"))?;
                binding.handle_response(Instant::now(), from, &buf[..n]);
            }
            () = sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "no answer within {} s ({} requests sent)",
                STUN_TIMEOUT.as_secs(),
                binding.stats().transmits
            ));
        }
        binding.handle_timeout(now);
    }
}

/// Whether the NAT keeps one public address for a socket whatever the destination: the
/// addresses two servers saw from the same socket.
fn mapping(answers: &[Answer], report: &mut Report) {
    report.start("the NAT's mapping behaviour");
    const CHECK: &str = "nat mapping";
    // One family decides: IPv4 when it has answers (NATs are an IPv4 matter).
    let v4 = answers.iter().any(|a| a.server.is_ipv4());
    let family: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.server.is_ipv4() == v4)
        .collect();
    let seen = family
        .iter()
        .map(|a| format!("{} seen by {}", a.mapped, a.server))
        .collect::<Vec<_>>()
        .join(", ");
    let check = match family.as_slice() {
        [] => Check::warn(
            CHECK,
            "cannot tell: no STUN server answered",
            "make a STUN server reachable over UDP (see above)",
        ),
        list if list.iter().any(|a| a.local) => Check::ok(
            CHECK,
            format!("no NAT: this device has a public address ({seen}); direct links likely"),
        ),
        [_] => Check::warn(
            CHECK,
            format!("cannot tell with one server ({seen})"),
            "add a second STUN server on another address to [nat] stun",
        ),
        [first, rest @ ..] if rest.iter().all(|a| a.mapped == first.mapped) => Check::ok(
            CHECK,
            format!("endpoint-independent mapping (cone NAT): direct links likely ({seen})"),
        ),
        _ => Check::warn(
            CHECK,
            format!(
                "address-dependent mapping (symmetric NAT): links to other symmetric NATs \
                 need a TURN relay ({seen})"
            ),
            "make sure a TURN server works (see the TURN checks); a router setting \
             (\"full cone\", \"endpoint-independent\") or UPnP/NAT-PMP may make the NAT a cone",
        ),
    };
    report.add(check);
}

// ---- TURN ----

/// How a TURN server is reached.
enum Link {
    Udp(UdpSocket),
    /// TCP or TLS.
    Stream {
        stream: Box<dyn TurnStream>,
        framer: StreamFramer,
    },
}

/// Why an allocation did not work.
enum TurnProblem {
    /// 401 to an authenticated Allocate.
    Credentials,
    /// No answer in time.
    Silent,
    /// Connection or socket trouble.
    Transport(String),
    /// The TLS handshake failed or the certificate was refused.
    Tls(String),
    /// Another refusal, in the core's words.
    Refused(String),
}

impl Link {
    async fn open(server: &IceServer, ca_file: Option<&Path>) -> Result<Link, TurnProblem> {
        let tls = match server.transport {
            IceTransport::Udp => {
                let any: IpAddr = if server.address.is_ipv6() {
                    Ipv6Addr::UNSPECIFIED.into()
                } else {
                    Ipv4Addr::UNSPECIFIED.into()
                };
                return UdpSocket::bind((any, 0))
                    .await
                    .map(Link::Udp)
                    .map_err(|e| TurnProblem::Transport(format!("cannot open a UDP socket: {e}")));
            }
            IceTransport::Tcp => None,
            IceTransport::Tls => {
                let config = ipop_xmpp::tls_config(ca_file)
                    .map_err(|e| TurnProblem::Tls(format!("no TLS client: {e}")))?;
                Some(TlsConnector::from(Arc::new(config)))
            }
        };
        let over = if tls.is_some() { "TLS" } else { "TCP" };
        match tokio::time::timeout(TURN_TIMEOUT, open_stream(server, tls)).await {
            Ok(Ok(stream)) => Ok(Link::Stream {
                stream,
                framer: StreamFramer::new(),
            }),
            // Connecting failed before TLS began.
            Ok(Err(why)) if over == "TCP" || why.starts_with("cannot connect") => {
                Err(TurnProblem::Transport(why))
            }
            Ok(Err(why)) => Err(TurnProblem::Tls(why)),
            Err(_) => Err(TurnProblem::Transport(format!(
                "no {over} connection within {} s",
                TURN_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn send(&mut self, to: SocketAddr, bytes: &[u8]) -> Result<(), TurnProblem> {
        let sent = match self {
            Link::Udp(socket) => socket.send_to(bytes, to).await.map(drop),
            Link::Stream { stream, .. } => {
                // TLS holds written data back until it is flushed.
                match stream.write_all(bytes).await {
                    Ok(()) => stream.flush().await,
                    Err(e) => Err(e),
                }
            }
        };
        sent.map_err(|e| TurnProblem::Transport(format!("cannot send: {e}")))
    }

    /// What arrived next: datagrams or whole frames, with their sender.
    async fn recv(
        &mut self,
        server: SocketAddr,
        buf: &mut [u8],
    ) -> Result<Vec<(SocketAddr, Vec<u8>)>, TurnProblem> {
        let lost = |e: String| TurnProblem::Transport(format!("connection lost: {e}"));
        match self {
            Link::Udp(socket) => {
                let (n, from) = socket
                    .recv_from(buf)
                    .await
                    .map_err(|e| TurnProblem::Transport(format!("cannot receive: {e}")))?;
                Ok(vec![(from, buf[..n].to_vec())])
            }
            Link::Stream { stream, framer } => {
                let n = stream.read(buf).await.map_err(|e| lost(e.to_string()))?;
                if n == 0 {
                    return Err(lost("the server closed the connection".to_owned()));
                }
                framer.push(&buf[..n]).map_err(|e| lost(e.to_string()))?;
                let mut frames = Vec::new();
                while let Some(frame) = framer.next_frame().map_err(|e| lost(e.to_string()))? {
                    frames.push((server, frame.to_vec()));
                }
                Ok(frames)
            }
        }
    }
}

/// Drives `turn` over `link` until it reports something, or `deadline` passes.
async fn next_event(
    link: &mut Link,
    turn: &mut TurnAllocation,
    deadline: Instant,
) -> Result<TurnEvent, TurnProblem> {
    let mut buf = vec![0u8; 65536];
    loop {
        while let Some((to, bytes)) = turn.poll_transmit() {
            link.send(to, &bytes).await?;
        }
        if let Some(event) = turn.poll_event() {
            return Ok(event);
        }
        let wake = turn.poll_timeout().map_or(deadline, |t| t.min(deadline));
        tokio::select! {
            got = link.recv(turn.server(), &mut buf) => {
                for (from, message) in got? {
                    turn.handle_input(Instant::now(), from, &message);
                }
            }
            () = sleep_until(wake.into()) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(TurnProblem::Silent);
        }
        turn.handle_timeout(now);
    }
}

/// Allocates on `server` and releases at once: the relayed address, the mapped address, and
/// whether the server confirmed the release.
async fn allocate(
    server: &IceServer,
    ca_file: Option<&Path>,
) -> Result<(SocketAddr, Option<SocketAddr>, bool), TurnProblem> {
    let deadline = Instant::now() + TURN_TIMEOUT;
    let mut link = Link::open(server, ca_file).await?;
    let credentials = TurnCredentials {
        username: server.username.clone().unwrap_or_default(),
        password: server.password.clone().unwrap_or_default(),
    };
    let mut turn = TurnAllocation::new(
        server.address,
        server.transport,
        credentials,
        Instant::now(),
        seed(),
    );
    let (relayed, mapped) = loop {
        match next_event(&mut link, &mut turn, deadline).await? {
            TurnEvent::Allocated { relayed, mapped } => break (relayed, mapped),
            TurnEvent::Failed { reason } if reason.contains("refused the credentials") => {
                return Err(TurnProblem::Credentials);
            }
            TurnEvent::Failed { reason } => return Err(TurnProblem::Refused(reason)),
            _ => {}
        }
    };
    turn.release(Instant::now());
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let released = loop {
        match next_event(&mut link, &mut turn, deadline).await {
            Ok(TurnEvent::Released) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    Ok((relayed, mapped, released))
}

async fn turn(server: &IceServer, source: &str, ca_file: Option<&Path>, report: &mut Report) {
    let transport = transport_name(server.transport);
    report.start(format_args!(
        "TURN allocation on {} over {transport} (from {source})",
        server_name(server)
    ));
    let name = format!("turn {transport} {}", server.address);
    let check = match allocate(server, ca_file).await {
        Ok((relayed, mapped, released)) => {
            let seen = mapped
                .map(|m| format!(", this device seen as {m}"))
                .unwrap_or_default();
            let release = if released {
                "released"
            } else {
                "release unconfirmed (the server frees it when it expires)"
            };
            Check::ok(name, format!("relayed address {relayed}{seen}; {release}"))
        }
        Err(TurnProblem::Credentials) => {
            let username = server.username.as_deref().unwrap_or_default();
            Check::fail(
                name,
                format!("the TURN server refused the credentials (401) of user {username:?}"),
                credentials_advice(username, source),
            )
        }
        Err(TurnProblem::Silent) => Check::fail(
            name,
            format!("no answer within {} s", TURN_TIMEOUT.as_secs()),
            if server.transport == IceTransport::Udp {
                "check the server's address and port; where a firewall blocks UDP, use a TURN \
                 server over TCP (transport = \"tcp\")"
            } else {
                "check the server's address and port: something accepted the connection but \
                 does not speak TURN"
            },
        ),
        Err(TurnProblem::Transport(why)) => Check::fail(
            name,
            why,
            "check the server's address and port, and that no firewall blocks the connection",
        ),
        Err(TurnProblem::Tls(why)) => Check::fail(
            name,
            why,
            format!(
                "the certificate must be valid for {:?} (the name in the server's entry, not its \
                 address) and signed by an authority this device trusts: the system's, or \
                 the CA in [xmpp] ca_file",
                server.host
            ),
        ),
        Err(TurnProblem::Refused(why)) => {
            Check::fail(name, why, "the server's log says more; ask its admin")
        }
    };
    report.add(check);
}

fn credentials_advice(username: &str, source: &str) -> String {
    if source != "[nat]" {
        return "the XMPP server hands out credentials the TURN server does not accept: their \
                shared secrets differ (Prosody's turn_external_secret, coturn's \
                static-auth-secret), or their clocks do"
            .to_owned();
    }
    // Time-limited credentials (TURN REST API) start with their expiry time.
    let expiry = username
        .split_once(':')
        .and_then(|(t, _)| t.parse::<u64>().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match expiry {
        Some(t) if t < now => format!(
            "these time-limited credentials expired {} s ago: get new ones",
            now - t
        ),
        _ => "check username and password of this [[nat.turn]]".to_owned(),
    }
}

// ---- Port mapping ----

/// Asks the default gateway for a short mapping of a throwaway UDP port, as the daemon asks
/// for its own (PCP, NAT-PMP, UPnP IGD), and deletes it: a running daemon's mapping is left
/// alone.
async fn port_mapping(config: &Config, report: &mut Report) {
    const CHECK: &str = "port mapping";
    report.start("port mapping on the default gateway (PCP, NAT-PMP, UPnP IGD)");
    if !config.nat.port_mapping {
        report.add(Check::ok(CHECK, "off ([nat] port_mapping = false)"));
        return;
    }
    let route = match crate::portmap::default_route() {
        Ok(Some(route)) => route,
        Ok(None) => {
            report.add(Check::ok(CHECK, "no IPv4 default gateway: nothing to ask"));
            return;
        }
        Err(e) => {
            report.add(Check::warn(
                CHECK,
                format!("cannot read the default route: {e}"),
                "the daemon cannot ask the router for a port mapping either",
            ));
            return;
        }
    };
    let port = std::net::UdpSocket::bind((route.local, 0))
        .and_then(|s| s.local_addr())
        .ok()
        .and_then(|a| std::num::NonZeroU16::new(a.port()));
    let Some(port) = port else {
        report.add(Check::warn(
            CHECK,
            format!("no UDP port free on {}", route.local),
            "the mapping could not be tried",
        ));
        return;
    };
    let check = match crate::portmap::map(route, port, Duration::from_secs(60)).await {
        Ok(m) => {
            let detail = format!(
                "the gateway {} maps {} to {} by {}",
                m.gateway, m.external, m.internal, m.protocol
            );
            match m.delete().await {
                Ok(()) => Check::ok(CHECK, format!("{detail} (a test mapping, deleted)")),
                Err(e) => Check::warn(
                    CHECK,
                    format!("{detail}, but deleting the test mapping failed: {e}"),
                    "the gateway drops it when its minute is over",
                ),
            }
        }
        Err(refused) => Check::warn(
            CHECK,
            format!("the gateway {} maps no port: {refused}", route.gateway),
            "links still work through STUN and TURN; for direct links behind a NAT that gives \
             every destination a new port, turn on UPnP IGD, NAT-PMP or PCP on the router",
        ),
    };
    report.add(check);
}

// ---- TUN ----

/// Creates a TUN device as the daemon does, with a temporary name, and removes it.
fn tun(report: &mut Report) {
    let name = format!("ipopdr{}", std::process::id());
    report.start(format_args!(
        "the permission to create a TUN device ({name})"
    ));
    let check = match crate::device::create(&name, &[], &[], &[], crate::config::DEFAULT_MTU) {
        Ok(device) => {
            // Closing the only descriptor removes the device.
            drop(device);
            Check::ok("tun", format!("created and removed {name}"))
        }
        Err(e) => {
            let advice = if Path::new(TUN_DEVICE).exists() {
                "run ipop as root or with the CAP_NET_ADMIN capability \
                 (setcap cap_net_admin=ep on the binary)"
                    .to_owned()
            } else {
                format!(
                    "{TUN_DEVICE} is missing: load the tun module (modprobe tun); in a \
                     container, pass {TUN_DEVICE} through"
                )
            };
            Check::fail("tun", format!("{e:#}"), advice)
        }
    };
    report.add(check);
}

/// A secret, random seed for a STUN or TURN client's transaction IDs.
fn seed() -> u64 {
    rand_core::RngCore::next_u64(&mut rand_core::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_open_to_others_fail_and_a_missing_key_is_left_to_ipop_up() {
        let dir = ipop_lab::TestDir::new("doctor-secrets");
        let path = dir.path().join("ipop.toml");
        std::fs::write(
            &path,
            "[xmpp]\njid = \"a@b\"\npassword_file = \"xmpp.pass\"\n[social]\n",
        )
        .expect("write config");
        let pass = dir.path().join("xmpp.pass");
        std::fs::write(&pass, "pw\n").expect("write password");
        let config = Config::load(&path).expect("config");
        let chmod = |mode| {
            std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };

        chmod(0o600);
        private_secrets(&config).expect("no key file, a private password file");
        chmod(0o644);
        let e = private_secrets(&config).expect_err("open password file");
        assert!(
            e.to_string()
                .contains(&format!("chmod 600 {}", pass.display())),
            "{e}"
        );
    }
}

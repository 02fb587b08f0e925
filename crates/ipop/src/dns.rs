//! The daemon's DNS responder: names derived from JIDs, answered on the overlay addresses.
//!
//! A device `laptop` of `bob@example.org` is `laptop.bob.example.org.ipop`, and
//! `bob.example.org.ipop` names the user (the table builder decides which device that is). The
//! responder is authoritative for the suffix (`ipop` by default) and for nothing else: it answers
//! A and AAAA from a [`NameTable`] that the daemon replaces through a watch channel whenever the
//! links change, and refuses names outside the suffix.
//!
//! It serves UDP only. Datagrams that are not DNS queries are dropped and counted
//! ([`malformed`]).
//!
//! A query it would refuse may be forwarded instead ([`Forwarding`]): this device's own
//! programs' queries to the responder of the exit in use, and the queries of the devices this
//! device is an exit for to this host's resolvers (`/etc/resolv.conf`). The answer is relayed
//! as it comes; one that does not come within [`FORWARD_TIMEOUT`] is a SERVFAIL.

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, watch};

/// Time to live of every answer: names follow links coming and going, so resolvers must not keep
/// them long.
pub const TTL_S: u32 = 10;

/// The largest DNS label (RFC 1035).
const MAX_LABEL: usize = 63;

/// A response to a query without EDNS never exceeds this (RFC 1035).
const PLAIN_UDP_LIMIT: usize = 512;

/// The largest response sent to a query with EDNS, whatever it advertises, and the payload size
/// advertised back: it fits in one packet on the overlay's 1420-byte MTU.
const EDNS_UDP_LIMIT: u16 = 1232;

/// How long a `resolvectl` command may run before it is killed.
const RESOLVECTL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a forwarded query may wait for its answer.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);

/// At most this many forwarded queries wait for an answer at once; more are answered SERVFAIL
/// at once.
const MAX_FORWARDING: usize = 256;

/// The response code of a refusal, as the header's low four bits of its fourth byte carry it.
const RCODE_REFUSED: u8 = 5;
const RCODE_SERVFAIL: u8 = 2;

/// Datagrams received by any responder of this process that were not DNS queries.
static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// Forwarded queries that got no answer.
static FORWARD_FAILED: AtomicU64 = AtomicU64::new(0);

/// How many forwarded queries got no answer (none in time, no resolver to ask, too many
/// waiting) since start: each was answered SERVFAIL.
pub fn forward_failed() -> u64 {
    FORWARD_FAILED.load(Ordering::Relaxed)
}

/// Where the responder sends the queries its table refuses (names outside the suffix, reverse
/// queries for other addresses). By default nowhere: they are refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// This device's own addresses: a query from one of them is its own programs'.
    pub own: Vec<IpAddr>,
    /// The responder of the exit in use, which this device's own queries go to.
    pub exit: Option<SocketAddr>,
    /// The networks of the overlays this device is an exit for: their devices' queries go to
    /// this host's resolvers.
    pub carried: Vec<IpNet>,
}

/// Where one query goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// The exit's responder.
    Exit(SocketAddr),
    /// This host's resolvers.
    Host,
}

impl Forwarding {
    /// Where a refused query from `from` goes instead, if anywhere. A device's own queries
    /// never go to its host's resolvers (they would come back: the host may point at this
    /// responder), and the devices it carries never reach its own exit.
    fn upstream(&self, from: IpAddr) -> Option<Upstream> {
        if self.own.contains(&from) {
            self.exit.map(Upstream::Exit)
        } else if self.carried.iter().any(|n| n.contains(&from)) {
            Some(Upstream::Host)
        } else {
            None
        }
    }
}

/// How many datagrams the responders of this process dropped since start because they were not
/// DNS queries: undecodable bytes (random data, a truncated header or record) and DNS responses
/// (never answered, so that two responders cannot feed each other).
pub fn malformed() -> u64 {
    MALFORMED.load(Ordering::Relaxed)
}

/// Names and their addresses; keys are lower-case fully-qualified names without the final dot.
///
/// The table answers for the names under its suffix only. Names longer than 253 characters can be
/// stored but never asked for (DNS cannot carry them). The default table has no suffix and
/// answers nothing (every query is refused).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    suffix: String,
    names: BTreeMap<String, Vec<IpAddr>>,
}

impl NameTable {
    /// An empty table for the names under `suffix` (lower-cased, without leading or final dot).
    pub fn new(suffix: &str) -> Self {
        NameTable {
            suffix: normalise(suffix),
            names: BTreeMap::new(),
        }
    }

    /// Adds `addr` to `name` (lower-cased, final dot removed), unless it is there already.
    pub fn insert(&mut self, name: &str, addr: IpAddr) {
        let addrs = self.names.entry(normalise(name)).or_default();
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }

    /// The addresses of `name`, in the order they were inserted; matching ignores case and a
    /// final dot.
    #[cfg(test)]
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        self.names.get(&normalise(name)).map(Vec::as_slice)
    }

    /// The suffix under which this table answers, e.g. `ipop`.
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// Whether `key` (normalised) is a name of the zone: the suffix itself, a name of the table
    /// or a name between them (`example.org.ipop` when `bob.example.org.ipop` exists), so that
    /// resolvers are not told that a name with names below it does not exist.
    fn exists(&self, key: &str) -> bool {
        key == self.suffix
            || self.names.contains_key(key)
            || self
                .names
                .keys()
                .any(|k| k.strip_suffix(key).is_some_and(|head| head.ends_with('.')))
    }
}

fn normalise(name: &str) -> String {
    name.trim_matches('.').to_ascii_lowercase()
}

/// Makes a DNS label from a JID part: lower-case; characters outside `[a-z0-9-]` become `-`.
///
/// Hyphens at either end are removed (resolvers reject host names that start with one). A label
/// longer than 63 characters is cut to 63 (then stripped of hyphens at its end again). A part that
/// leaves nothing (empty, or only characters outside the set, such as a name in another script)
/// becomes `x` followed by 8 hexadecimal digits of a hash of the part (FNV-1a, 32 bits), so that
/// two such parts still get distinct, stable labels.
pub fn label(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut out = mapped.trim_matches('-').to_string();
    if out.len() > MAX_LABEL {
        out.truncate(MAX_LABEL);
        out.truncate(out.trim_end_matches('-').len());
    }
    if out.is_empty() {
        out = format!("x{:08x}", fnv1a(s.as_bytes()));
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash: u32, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// `laptop.bob.example.org.<suffix>` for user `bob@example.org`, device `laptop`.
///
/// Each part of the JID becomes a [`label`] (each dot-separated part of the domain separately); a
/// resource in `user` is ignored; a JID without local part (`example.org`) gives
/// `laptop.example.org.<suffix>`.
pub fn device_name(user: &str, device: &str, suffix: &str) -> String {
    format!("{}.{}", label(device), user_name(user, suffix))
}

/// `bob.example.org.<suffix>` for user `bob@example.org` (see [`device_name`]).
pub fn user_name(user: &str, suffix: &str) -> String {
    let bare = user.split('/').next().unwrap_or_default();
    let (local, domain) = match bare.split_once('@') {
        Some((local, domain)) => (Some(local), domain),
        None => (None, bare),
    };
    let mut labels: Vec<String> = local.map(label).into_iter().collect();
    labels.extend(domain.split('.').filter(|l| !l.is_empty()).map(label));
    let suffix = normalise(suffix);
    if !suffix.is_empty() {
        labels.push(suffix);
    }
    labels.join(".")
}

/// Answers queries on `sockets` (UDP, one per overlay address) from the latest table in `names`,
/// forwarding what it refuses as `forwarding` says, until `names`' sender is dropped (at once
/// when there is no socket). One task per socket.
pub async fn serve(
    sockets: Vec<UdpSocket>,
    names: watch::Receiver<NameTable>,
    forwarding: watch::Receiver<Forwarding>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let waiting = Arc::new(Semaphore::new(MAX_FORWARDING));
    for socket in sockets {
        tasks.spawn(serve_socket(
            Arc::new(socket),
            names.clone(),
            forwarding.clone(),
            waiting.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
}

async fn serve_socket(
    socket: Arc<UdpSocket>,
    mut names: watch::Receiver<NameTable>,
    forwarding: watch::Receiver<Forwarding>,
    waiting: Arc<Semaphore>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            changed = names.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            received = socket.recv_from(&mut buf) => {
                let (len, from) = match received {
                    Ok(r) => r,
                    // An ICMP error about an earlier response: nothing to do.
                    Err(e) if is_icmp_error(&e) => continue,
                    Err(e) => {
                        tracing::warn!("DNS receive: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(response) = respond(&buf[..len], &names.borrow()) else {
                    continue;
                };
                let upstream = forwarding.borrow().upstream(from.ip());
                if let Some(upstream) = upstream.filter(|_| refused(&response)) {
                    let own = forwarding.borrow().own.clone();
                    let query = buf[..len].to_vec();
                    match waiting.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let socket = socket.clone();
                            tokio::spawn(async move {
                                let answer = forward(&query, upstream, &own).await;
                                drop(permit);
                                reply(&socket, answer, response, from).await;
                            });
                        }
                        Err(_) => reply(&socket, None, response, from).await,
                    }
                    continue;
                }
                send(&socket, &response, from).await;
            }
        }
    }
}

async fn send(socket: &UdpSocket, response: &[u8], to: SocketAddr) {
    if let Err(e) = socket.send_to(response, to).await {
        tracing::debug!(%to, "DNS send: {e}");
    }
}

/// Sends a forwarded query's `answer` to `to`, or when there is none, the `refused` response
/// turned into a SERVFAIL.
async fn reply(socket: &UdpSocket, answer: Option<Vec<u8>>, mut refused: Vec<u8>, to: SocketAddr) {
    match answer {
        Some(answer) => send(socket, &answer, to).await,
        None => {
            FORWARD_FAILED.fetch_add(1, Ordering::Relaxed);
            if let Some(flags) = refused.get_mut(3) {
                *flags = (*flags & 0xf0) | RCODE_SERVFAIL;
            }
            send(socket, &refused, to).await;
        }
    }
}

/// Whether a response of [`respond`] refuses its query.
fn refused(response: &[u8]) -> bool {
    response
        .get(3)
        .is_some_and(|flags| flags & 0x0f == RCODE_REFUSED)
}

/// Asks `upstream` the `query` as it came, and returns the answer with the query's ID, or
/// `None` when none comes within [`FORWARD_TIMEOUT`] or there is no resolver to ask.
async fn forward(query: &[u8], upstream: Upstream, own: &[IpAddr]) -> Option<Vec<u8>> {
    let to = match upstream {
        Upstream::Exit(to) => to,
        Upstream::Host => host_resolver(own).await?,
    };
    let local: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local).await.ok()?;
    socket.connect(to).await.ok()?;
    socket.send(query).await.ok()?;
    let id = query.get(..2)?;
    let mut buf = vec![0u8; 4096];
    tokio::time::timeout(FORWARD_TIMEOUT, async {
        loop {
            match socket.recv(&mut buf).await {
                Ok(len) if buf.get(..2) == Some(id) && len > 3 => {
                    buf.truncate(len);
                    return Some(buf);
                }
                Ok(_) => {}
                Err(e) if is_icmp_error(&e) => return None,
                Err(e) => {
                    tracing::debug!(%to, "forwarded DNS query: {e}");
                    return None;
                }
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// The first resolver `/etc/resolv.conf` names that is not one of this device's `own`
/// addresses, on port 53.
async fn host_resolver(own: &[IpAddr]) -> Option<SocketAddr> {
    let text = tokio::task::spawn_blocking(|| std::fs::read("/etc/resolv.conf"))
        .await
        .ok()?
        .ok()?;
    let conf = resolv_conf::Config::parse(text)
        .map_err(|e| tracing::debug!("/etc/resolv.conf: {e}"))
        .ok()?;
    conf.get_nameservers_or_local()
        .iter()
        .map(IpAddr::from)
        .find(|ip| !own.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
}

fn is_icmp_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset
    )
}

/// The response to one datagram received by a responder, answered from `table`, or `None` when
/// it is not a DNS query (counted in [`malformed`]). A response never exceeds 512 bytes, or the
/// payload size the query advertises with EDNS (at most 1232 bytes); answers that do not fit are
/// left out and the response marked truncated.
pub fn respond(datagram: &[u8], table: &NameTable) -> Option<Vec<u8>> {
    let query = match Message::from_vec(datagram) {
        Ok(q) if q.metadata.message_type == MessageType::Query => q,
        _ => {
            MALFORMED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata = Metadata::response_from_request(&query.metadata);
    response.add_queries(query.queries.iter().cloned());
    let limit = match &query.edns {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(EDNS_UDP_LIMIT);
            response.set_edns(ours);
            usize::from(edns.max_payload().clamp(512, EDNS_UDP_LIMIT))
        }
        None => PLAIN_UDP_LIMIT,
    };
    response.metadata.response_code = if query.metadata.op_code != OpCode::Query {
        ResponseCode::NotImp
    } else if query.edns.as_ref().is_some_and(|e| e.version() != 0) {
        ResponseCode::BADVERS
    } else if let [question] = query.queries.as_slice() {
        answer(question, table, &mut response)
    } else {
        ResponseCode::FormErr
    };
    encode(response, limit)
}

/// Fills the answers for `question` and returns the response code.
fn answer(
    question: &hickory_proto::op::Query,
    table: &NameTable,
    response: &mut Message,
) -> ResponseCode {
    let name = question.name();
    if question.query_type() == RecordType::PTR
        && let Ok(net) = name.parse_arpa_name()
        && net.prefix_len() == net.max_prefix_len()
    {
        return reverse(question, net.addr(), table, response);
    }
    let Some(key) = zone_key(name, table.suffix()) else {
        return ResponseCode::Refused;
    };
    if !matches!(question.query_class(), DNSClass::IN | DNSClass::ANY) {
        return ResponseCode::Refused;
    }
    response.metadata.authoritative = true;
    let addrs = key.as_deref().and_then(|k| table.names.get(k));
    let Some(addrs) = addrs else {
        return if key.is_some_and(|k| table.exists(&k)) {
            ResponseCode::NoError
        } else {
            ResponseCode::NXDomain
        };
    };
    for addr in addrs {
        let rdata = match (question.query_type(), addr) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        response.add_answer(Record::from_rdata(name.clone(), TTL_S, rdata));
    }
    ResponseCode::NoError
}

/// Answers a reverse query for an overlay address of the table with the address's name: the
/// device's (`laptop.bob.example.org.ipop`) rather than the user's. Other addresses are not ours
/// to answer for.
fn reverse(
    question: &hickory_proto::op::Query,
    addr: IpAddr,
    table: &NameTable,
    response: &mut Message,
) -> ResponseCode {
    let owner = table
        .names
        .iter()
        .filter(|(_, addrs)| addrs.contains(&addr))
        .max_by_key(|(name, _)| name.matches('.').count())
        .and_then(|(name, _)| Name::from_ascii(format!("{name}.")).ok());
    let Some(owner) = owner else {
        return ResponseCode::Refused;
    };
    response.metadata.authoritative = true;
    response.add_answer(Record::from_rdata(
        question.name().clone(),
        TTL_S,
        RData::PTR(PTR(owner)),
    ));
    ResponseCode::NoError
}

/// For a name under `suffix`: `Some` of its table key, which is `None` when a label holds bytes
/// that no name of the table can have (such a name does not exist). `None` outside the suffix.
fn zone_key(name: &Name, suffix: &str) -> Option<Option<String>> {
    if suffix.is_empty() {
        return None;
    }
    let labels: Vec<&[u8]> = name.iter().collect();
    let suffix_labels: Vec<&str> = suffix.split('.').collect();
    let tail = labels.len().checked_sub(suffix_labels.len())?;
    let in_zone = labels[tail..]
        .iter()
        .zip(&suffix_labels)
        .all(|(l, s)| l.eq_ignore_ascii_case(s.as_bytes()));
    if !in_zone {
        return None;
    }
    let head = &labels[..tail];
    if !head
        .iter()
        .all(|l| l.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-'))
    {
        return Some(None);
    }
    let mut key: Vec<String> = head
        .iter()
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    key.push(suffix.to_string());
    let key = key.join(".");
    Some(Some(key))
}

/// Encodes `response` within `limit` bytes, dropping answers from the end and setting TC when
/// they do not all fit. An error response to a query with more questions than fit (a resolver
/// asks one at a time) goes without them.
fn encode(mut response: Message, limit: usize) -> Option<Vec<u8>> {
    loop {
        match response.to_vec() {
            Ok(bytes) if bytes.len() <= limit => return Some(bytes),
            Ok(_) if !response.answers.is_empty() => {
                response.answers.pop();
                response.metadata.truncation = true;
            }
            // The header and the OPT record alone always fit.
            Ok(bytes) if response.queries.is_empty() => return Some(bytes),
            Ok(_) => response.queries.clear(),
            Err(e) => {
                tracing::debug!("DNS response not encodable: {e}");
                return None;
            }
        }
    }
}

/// Binds UDP port `port` (53 in production) on each address; an address that cannot be bound is
/// logged and skipped. The addresses must be assigned already (overlay addresses: after the
/// interface is configured).
pub async fn bind(addrs: &[IpAddr], port: u16) -> Vec<UdpSocket> {
    let mut sockets = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match UdpSocket::bind((*addr, port)).await {
            Ok(socket) => {
                tracing::debug!(%addr, port, "DNS responder bound");
                sockets.push(socket);
            }
            Err(e) => tracing::warn!(%addr, port, "cannot serve DNS on this address: {e}"),
        }
    }
    sockets
}

/// When systemd-resolved runs (`resolvectl` exists and `resolvectl status` succeeds), sends the
/// names under `~suffix` to `servers` through `interface` (`resolvectl dns`, `resolvectl domain`)
/// and keeps other names off that interface (`resolvectl default-route … false`); returns true.
/// With `everything` (DNS through the exit), every name goes there (`~.`, default route).
/// Otherwise, or when resolved refuses, returns false.
pub fn register_with_resolved(
    interface: &str,
    servers: &[IpAddr],
    suffix: &str,
    everything: bool,
) -> bool {
    register_with(&["resolvectl"], interface, servers, suffix, everything)
}

/// Undoes [`register_with_resolved`] (`resolvectl revert IFACE`).
pub fn unregister_from_resolved(interface: &str) {
    unregister_with(&["resolvectl"], interface);
}

/// [`register_with_resolved`] with `resolvectl` being the command `program` (its first element
/// is the executable, the rest come before the subcommand).
fn register_with(
    program: &[&str],
    interface: &str,
    servers: &[IpAddr],
    suffix: &str,
    everything: bool,
) -> bool {
    if let Err(e) = run(program, &["status"], RESOLVECTL_TIMEOUT) {
        tracing::debug!(
            "systemd-resolved is not in use ({e}); names under .{suffix} are served on the overlay addresses only"
        );
        return false;
    }
    let servers: Vec<String> = servers.iter().map(IpAddr::to_string).collect();
    let mut dns = vec!["dns", interface];
    dns.extend(servers.iter().map(String::as_str));
    let domain = format!("~{}", normalise(suffix));
    let mut domains = vec!["domain", interface, &domain];
    if everything {
        domains.push("~.");
    }
    for args in [dns, domains] {
        if let Err(e) = run(program, &args, RESOLVECTL_TIMEOUT) {
            tracing::warn!("cannot register the DNS responder with systemd-resolved: {e}");
            return false;
        }
    }
    // Only systemd 240 and later know this; without it the interface gets other names too.
    let default_route = if everything { "true" } else { "false" };
    if let Err(e) = run(
        program,
        &["default-route", interface, default_route],
        RESOLVECTL_TIMEOUT,
    ) {
        tracing::debug!("{e}");
    }
    if everything {
        tracing::info!(
            interface,
            servers = %servers.join(" "),
            "systemd-resolved sends every name to the DNS responder, which asks the exit"
        );
    } else {
        tracing::info!(
            interface,
            servers = %servers.join(" "),
            "systemd-resolved sends names under .{} to the DNS responder",
            normalise(suffix)
        );
    }
    true
}

fn unregister_with(program: &[&str], interface: &str) {
    match run(program, &["revert", interface], RESOLVECTL_TIMEOUT) {
        Ok(()) => tracing::info!(interface, "DNS settings reverted in systemd-resolved"),
        Err(e) => tracing::debug!(interface, "{e}"),
    }
}

/// Runs `program` with `args`, killing it after `timeout`; `Err` says why it did not
/// succeed, with what it wrote on stderr.
fn run(program: &[&str], args: &[&str], timeout: Duration) -> Result<(), String> {
    let (exe, head) = program.split_first().ok_or("no program")?;
    let shown = format!("{} {}", program.join(" "), args.join(" "));
    let mut child = Command::new(exe)
        .args(head)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status: ExitStatus = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                // Kill and reap; errors only mean it ended by itself meanwhile.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: no answer within {timeout:?}"));
            }
            Err(e) => return Err(format!("{shown}: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        // What it wrote is only for the message; an unreadable stderr leaves it empty.
        let _ = pipe.read_to_string(&mut stderr);
    }
    Err(format!("{shown}: {status}: {}", stderr.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    const BOB4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 78, 0, 2));
    const BOB6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2));

    fn table() -> NameTable {
        let mut t = NameTable::new("ipop");
        t.insert("laptop.bob.example.org.ipop", BOB4);
        t.insert("laptop.bob.example.org.ipop", BOB6);
        t.insert("bob.example.org.ipop", BOB4);
        t.insert(
            "phone.bob.example.org.ipop",
            IpAddr::V4(Ipv4Addr::new(10, 78, 0, 3)),
        );
        t
    }

    fn query(name: &str, rtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m
    }

    fn ask_table(q: &Message, t: &NameTable) -> Message {
        let bytes = respond(&q.to_vec().unwrap(), t).expect("a response");
        Message::from_vec(&bytes).unwrap()
    }

    fn addrs(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("unexpected answer {other:?}"),
            })
            .collect()
    }

    #[test]
    fn table_lower_cases_and_keeps_addresses_unique() {
        let mut t = NameTable::new(".IPOP.");
        assert_eq!(t.suffix(), "ipop");
        t.insert("Laptop.Bob.Example.org.ipop.", BOB4);
        t.insert("laptop.bob.example.org.ipop", BOB4);
        t.insert("laptop.bob.example.org.ipop", BOB6);
        assert_eq!(
            t.lookup("LAPTOP.bob.example.org.ipop"),
            Some(&[BOB4, BOB6][..])
        );
        assert_eq!(
            t.lookup("laptop.bob.example.org.ipop."),
            Some(&[BOB4, BOB6][..])
        );
        assert_eq!(t.lookup("phone.bob.example.org.ipop"), None);
        assert_eq!(NameTable::default().suffix(), "");
        assert_ne!(t, NameTable::new("ipop"));
    }

    #[test]
    fn labels_are_host_name_labels() {
        assert_eq!(label("Laptop"), "laptop");
        assert_eq!(label("Bob's Laptop"), "bob-s-laptop");
        assert_eq!(label("my_phone.home"), "my-phone-home");
        assert_eq!(label("-edge-"), "edge");
        assert_eq!(label("Émile"), "mile");
        assert_eq!(label("a-1"), "a-1");
        let long = "a".repeat(62) + "-bcd";
        assert_eq!(label(&long), "a".repeat(62));
        assert_eq!(label(&"z".repeat(100)).len(), 63);
        // Nothing left: a stable hashed label, distinct for distinct parts.
        let empty = label("");
        assert_eq!(empty, "x811c9dc5");
        let cyrillic = label("ноутбук");
        assert!(
            cyrillic.starts_with('x') && cyrillic.len() == 9,
            "{cyrillic}"
        );
        assert_eq!(cyrillic, label("ноутбук"));
        assert_ne!(cyrillic, label("телефон"));
        assert_ne!(label("--"), label("---"));
    }

    #[test]
    fn names_from_jids() {
        assert_eq!(
            device_name("bob@example.org", "laptop", "ipop"),
            "laptop.bob.example.org.ipop"
        );
        assert_eq!(
            device_name("Bob@Example.ORG/ignored", "Work PC", "vpn.lan"),
            "work-pc.bob.example.org.vpn.lan"
        );
        assert_eq!(user_name("bob@example.org", "ipop"), "bob.example.org.ipop");
        assert_eq!(
            user_name("bob.smith@example.org", "ipop."),
            "bob-smith.example.org.ipop"
        );
        assert_eq!(user_name("example.org", "ipop"), "example.org.ipop");
    }

    #[test]
    fn answers_from_the_table() {
        let t = table();
        let r = ask_table(&query("laptop.bob.example.org.ipop.", RecordType::A), &t);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert!(r.metadata.recursion_desired);
        assert!(!r.metadata.truncation);
        assert_eq!(addrs(&r), [BOB4]);
        assert!(r.answers.iter().all(|a| a.ttl == TTL_S));
        // The suffix and the names between it and the table's names exist, without addresses.
        for name in ["ipop.", "example.org.ipop.", "org.ipop."] {
            let r = ask_table(&query(name, RecordType::A), &t);
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(r.answers.is_empty(), "{name}");
        }
        // A label no table name can have.
        let mut q = Message::query();
        let odd = Name::from_labels(vec![&b"a b"[..], b"ipop"]).unwrap();
        q.add_query(Query::query(odd, RecordType::A));
        assert_eq!(
            ask_table(&q, &t).metadata.response_code,
            ResponseCode::NXDomain
        );
        // A default table refuses everything.
        let r = ask_table(
            &query("bob.example.org.ipop.", RecordType::A),
            &NameTable::default(),
        );
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn reverse_queries_name_the_device() {
        let t = table();
        let ptr = |arpa: &str| {
            let r = ask_table(&query(arpa, RecordType::PTR), &t);
            let names: Vec<String> = r
                .answers
                .iter()
                .map(|a| match &a.data {
                    RData::PTR(p) => p.0.to_string(),
                    other => panic!("unexpected answer {other:?}"),
                })
                .collect();
            (r.metadata.response_code, names)
        };
        // 10.78.0.2 is both the user's and the laptop's: the device's name wins.
        assert_eq!(
            ptr("2.0.78.10.in-addr.arpa."),
            (
                ResponseCode::NoError,
                vec!["laptop.bob.example.org.ipop.".to_owned()]
            )
        );
        let v6 = "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(ptr(v6).1, vec!["laptop.bob.example.org.ipop.".to_owned()]);
        // An address that is not an overlay peer's is not ours to answer for.
        assert_eq!(ptr("9.9.9.9.in-addr.arpa.").0, ResponseCode::Refused);
    }

    #[test]
    fn odd_queries_get_an_error_code() {
        let t = table();
        let mut two = query("bob.example.org.ipop.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("laptop.bob.example.org.ipop.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            ask_table(&two, &t).metadata.response_code,
            ResponseCode::FormErr
        );
        let none = Message::query();
        assert_eq!(
            ask_table(&none, &t).metadata.response_code,
            ResponseCode::FormErr
        );
        let mut status = query("bob.example.org.ipop.", RecordType::A);
        status.metadata.op_code = OpCode::Status;
        assert_eq!(
            ask_table(&status, &t).metadata.response_code,
            ResponseCode::NotImp
        );
        let mut chaos = query("bob.example.org.ipop.", RecordType::A);
        chaos.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(
            ask_table(&chaos, &t).metadata.response_code,
            ResponseCode::Refused
        );
        let mut v1 = query("bob.example.org.ipop.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_version(1);
        v1.set_edns(edns);
        let r = ask_table(&v1, &t);
        // 16 reads back as BADSIG, which shares the code.
        assert_eq!(
            u16::from(r.metadata.response_code),
            u16::from(ResponseCode::BADVERS)
        );
        assert_eq!(r.edns.map(|e| e.version()), Some(0));
    }

    #[test]
    fn large_answers_fit_in_512_bytes_without_edns() {
        let mut t = NameTable::new("ipop");
        let name = format!("{}.bob.example.org.ipop", "d".repeat(60));
        for i in 0..100u8 {
            t.insert(&name, IpAddr::V4(Ipv4Addr::new(10, 78, 1, i)));
        }
        let q = query(&format!("{name}."), RecordType::A);
        let bytes = respond(&q.to_vec().unwrap(), &t).unwrap();
        assert!(bytes.len() <= 512, "{}", bytes.len());
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.metadata.truncation);
        assert!(!r.answers.is_empty() && r.answers.len() < 100);
        assert_eq!(r.queries, q.queries);
        // With EDNS and a large buffer: up to the overlay's limit, with an OPT record back.
        let mut q = q;
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        q.set_edns(edns);
        let bytes = respond(&q.to_vec().unwrap(), &t).unwrap();
        assert!(bytes.len() > 512 && bytes.len() <= 1232, "{}", bytes.len());
        let r = Message::from_vec(&bytes).unwrap();
        assert!(r.edns.is_some());
        // 100 records of 16 bytes do not fit in 1232 bytes either.
        assert!(r.metadata.truncation);
        t = NameTable::new("ipop");
        for i in 0..40u8 {
            t.insert(&name, IpAddr::V4(Ipv4Addr::new(10, 78, 1, i)));
        }
        let r = Message::from_vec(&respond(&q.to_vec().unwrap(), &t).unwrap()).unwrap();
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 40);
    }

    /// A query with more questions than a response can echo within 512 bytes (a resolver never
    /// sends one) gets its error without them, within the limit.
    #[test]
    fn a_query_with_many_questions_gets_a_short_error() {
        let mut q = Message::query();
        for i in 0..12 {
            let name = format!("{}{i}.bob.example.org.ipop.", "q".repeat(40));
            q.add_query(Query::query(
                Name::from_ascii(&name).unwrap(),
                RecordType::A,
            ));
        }
        let query = q.to_vec().unwrap();
        assert!(query.len() > 512, "{}", query.len());
        let response = respond(&query, &table()).expect("a response");
        assert!(response.len() <= 512, "{}", response.len());
        let r = Message::from_vec(&response).unwrap();
        assert_eq!(r.metadata.id, q.metadata.id);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    }

    #[test]
    fn responses_are_never_answered() {
        let before = malformed();
        let mut m = query("bob.example.org.ipop.", RecordType::A);
        m.metadata.message_type = MessageType::Response;
        assert_eq!(respond(&m.to_vec().unwrap(), &table()), None);
        assert!(malformed() > before);
    }

    /// A responder on 127.0.0.1 with an ephemeral port, and a client socket.
    struct Server {
        addr: SocketAddr,
        client: UdpSocket,
        names: watch::Sender<NameTable>,
        forwarding: watch::Sender<Forwarding>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start(t: NameTable) -> Server {
            let sockets = bind(&[IpAddr::V4(Ipv4Addr::LOCALHOST)], 0).await;
            assert_eq!(sockets.len(), 1);
            let addr = sockets[0].local_addr().unwrap();
            let (names, rx) = watch::channel(t);
            let (forwarding, forwarded) = watch::channel(Forwarding::default());
            let task = tokio::spawn(serve(sockets, rx, forwarded));
            let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
            Server {
                addr,
                client,
                names,
                forwarding,
                task,
            }
        }

        async fn ask(&self, name: &str, rtype: RecordType) -> Message {
            let q = query(name, rtype);
            let r = self.exchange(&q.to_vec().unwrap()).await;
            assert_eq!(r.metadata.id, q.metadata.id);
            assert_eq!(r.metadata.message_type, MessageType::Response);
            assert_eq!(r.queries, q.queries, "the question is echoed");
            r
        }

        async fn exchange(&self, datagram: &[u8]) -> Message {
            self.client.send_to(datagram, self.addr).await.unwrap();
            let mut buf = [0u8; 2048];
            let (len, _) =
                tokio::time::timeout(Duration::from_secs(5), self.client.recv_from(&mut buf))
                    .await
                    .expect("an answer within 5 s")
                    .unwrap();
            Message::from_vec(&buf[..len]).unwrap()
        }
    }

    /// A resolver upstream that answers every A query with `answer`.
    async fn upstream(answer: Ipv4Addr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((len, from)) = socket.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..len]).unwrap();
                let mut r = Message::response(q.metadata.id, q.metadata.op_code);
                r.metadata = Metadata::response_from_request(&q.metadata);
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.iter().cloned());
                let name = q.queries[0].name().clone();
                r.add_answer(Record::from_rdata(name, 60, RData::A(A(answer))));
                socket.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn names_outside_the_suffix_go_through_the_exit_for_own_queries_only() {
        let server = Server::start(table()).await;
        let far = Ipv4Addr::new(198, 51, 100, 7);
        let (exit, resolver) = upstream(far).await;
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        // The client is this device: its query for a name outside the suffix goes to the exit,
        // and the answer comes back as the exit gave it.
        let through_exit = Forwarding {
            own: vec![localhost],
            exit: Some(exit),
            carried: Vec::new(),
        };
        server.forwarding.send_replace(through_exit.clone());
        let r = server.ask("www.example.com.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&r), [IpAddr::V4(far)]);
        assert!(r.metadata.recursion_available);
        // Names under the suffix are still answered here.
        let r = server
            .ask("laptop.bob.example.org.ipop.", RecordType::A)
            .await;
        assert_eq!(addrs(&r), [BOB4]);
        assert!(r.metadata.authoritative);
        // A device that is neither this one nor carried by it is refused.
        server.forwarding.send_replace(Forwarding {
            own: vec![IpAddr::V4(Ipv4Addr::new(10, 78, 0, 1))],
            exit: Some(exit),
            carried: vec!["10.78.0.0/16".parse().unwrap()],
        });
        let r = server.ask("www.example.com.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        // No exit: refused, as without forwarding.
        server.forwarding.send_replace(Forwarding {
            own: vec![localhost],
            exit: None,
            carried: Vec::new(),
        });
        let r = server.ask("www.example.com.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        // An exit that does not answer: SERVFAIL, counted.
        resolver.abort();
        let _ = resolver.await;
        let failed = forward_failed();
        server.forwarding.send_replace(through_exit);
        let r = server.ask("www.example.com.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert!(forward_failed() > failed);
    }

    #[test]
    fn only_own_queries_go_to_the_exit_and_only_carried_ones_to_the_host() {
        let exit: SocketAddr = "10.78.0.9:53".parse().unwrap();
        let f = Forwarding {
            own: vec![BOB4],
            exit: Some(exit),
            carried: vec!["10.77.0.0/16".parse().unwrap()],
        };
        assert_eq!(f.upstream(BOB4), Some(Upstream::Exit(exit)));
        assert_eq!(
            f.upstream("10.77.3.4".parse().unwrap()),
            Some(Upstream::Host)
        );
        assert_eq!(f.upstream("10.78.0.9".parse().unwrap()), None);
        // A device carried by this one never reaches this device's own exit, nor the other way.
        let f = Forwarding {
            own: vec![BOB4],
            exit: None,
            carried: vec!["10.78.0.0/16".parse().unwrap()],
        };
        assert_eq!(f.upstream(BOB4), None);
    }

    #[tokio::test]
    async fn serves_queries_over_udp() {
        let server = Server::start(table()).await;

        let r = server
            .ask("laptop.bob.example.org.ipop.", RecordType::A)
            .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(addrs(&r), [BOB4]);

        let r = server
            .ask("laptop.bob.example.org.ipop.", RecordType::AAAA)
            .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&r), [BOB6]);

        // Mixed case matches, and the answer carries the name as asked.
        let r = server
            .ask("LapTop.BOB.example.ORG.Ipop.", RecordType::A)
            .await;
        assert_eq!(addrs(&r), [BOB4]);
        assert_eq!(r.answers[0].name.to_ascii(), "LapTop.BOB.example.ORG.Ipop.");

        // NODATA: the name exists, without an address of that type or with no such records.
        for rtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let r = server.ask("bob.example.org.ipop.", rtype).await;
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{rtype}");
            assert!(r.metadata.authoritative);
            assert!(r.answers.is_empty(), "{rtype}");
        }

        let r = server
            .ask("tablet.bob.example.org.ipop.", RecordType::A)
            .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());

        let r = server.ask("example.org.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(!r.metadata.authoritative);
        let r = server
            .ask("bob.example.org.ipop.example.", RecordType::A)
            .await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn a_new_table_is_seen_by_the_next_query() {
        let server = Server::start(table()).await;
        let tablet = "tablet.bob.example.org.ipop.";
        let r = server.ask(tablet, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

        let mut t = table();
        let addr = IpAddr::V4(Ipv4Addr::new(10, 78, 0, 9));
        t.insert(tablet, addr);
        server.names.send(t).unwrap();
        let r = server.ask(tablet, RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&r), [addr]);

        server.names.send(NameTable::new("ipop")).unwrap();
        let r = server
            .ask("laptop.bob.example.org.ipop.", RecordType::A)
            .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn garbage_is_counted_and_dropped() {
        let server = Server::start(table()).await;
        let before = malformed();
        let valid = query("bob.example.org.ipop.", RecordType::A)
            .to_vec()
            .unwrap();
        // Deterministic pseudo-random bytes under a query header whose counts promise far more
        // records than follow.
        let mut state = 0x2545_f491_u32;
        let mut random: Vec<u8> = (0..64)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state.to_le_bytes()[0]
            })
            .collect();
        random[2] = 0;
        random[4..12].copy_from_slice(&[0, 1, 0xff, 0xff, 0, 0, 0, 0]);
        let junk: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0x12],
            valid[..7].to_vec(),
            valid[..valid.len() - 3].to_vec(),
            vec![0xff; 300],
            random,
        ];
        for j in &junk {
            server.client.send_to(j, server.addr).await.unwrap();
        }
        // The socket takes datagrams in order: the first response is the one to this query
        // (`ask` checks its id), so none of the junk was answered and all of it was handled.
        let r = server.ask("bob.example.org.ipop.", RecordType::A).await;
        assert_eq!(addrs(&r), [BOB4]);
        let after = malformed();
        assert!(after >= before + junk.len() as u64, "{before} -> {after}");
    }

    #[tokio::test]
    async fn serve_ends_when_the_table_sender_is_dropped() {
        let server = Server::start(table()).await;
        server.ask("bob.example.org.ipop.", RecordType::A).await;
        drop(server.names);
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .expect("serve ended")
            .unwrap();
    }

    #[tokio::test]
    async fn unbindable_addresses_are_skipped() {
        // 192.0.2.1 (TEST-NET-1) is not an address of this machine.
        let sockets = bind(
            &[
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::V4(Ipv4Addr::LOCALHOST),
            ],
            0,
        )
        .await;
        assert_eq!(sockets.len(), 1);
        assert!(sockets[0].local_addr().unwrap().ip().is_loopback());
    }

    #[test]
    fn resolved_absent() {
        assert!(!register_with(
            &["/nonexistent/resolvectl"],
            "ipop0",
            &[BOB4],
            "ipop",
            false
        ));
        if Command::new("resolvectl")
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            assert!(!register_with_resolved("ipop0", &[BOB4], "ipop", false));
            unregister_from_resolved("ipop0");
        }
    }

    #[test]
    fn resolved_commands() {
        // A stand-in resolvectl that appends its arguments to a log.
        let log = std::env::temp_dir().join(format!("ipop-dns-resolvectl-{}", std::process::id()));
        let script = format!("printf '%s\\n' \"$*\" >> '{}'", log.display());
        let fake = ["sh", "-c", &script, "resolvectl"];
        assert!(register_with(&fake, "ipop0", &[BOB4, BOB6], "IPOP", false));
        unregister_with(&fake, "ipop0");
        // DNS through the exit: every name.
        assert!(register_with(&fake, "ipop0", &[BOB4], "ipop", true));
        let written = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_file(&log).unwrap();
        assert_eq!(
            written,
            "status\ndns ipop0 10.78.0.2 fd00::2\ndomain ipop0 ~ipop\ndefault-route ipop0 false\nrevert ipop0\n\
             status\ndns ipop0 10.78.0.2\ndomain ipop0 ~ipop ~.\ndefault-route ipop0 true\n"
        );
        // resolved present but refusing: not registered.
        assert!(!register_with(
            &["sh", "-c", "[ \"$1\" = status ]", "resolvectl"],
            "ipop0",
            &[BOB4],
            "ipop",
            false
        ));
    }

    #[test]
    fn commands_are_bounded_in_time() {
        let second = Duration::from_secs(1);
        assert_eq!(run(&["true"], &[], second), Ok(()));
        let err = run(&["sh", "-c", "echo nope >&2; exit 3"], &[], second).unwrap_err();
        assert!(err.contains("nope") && err.contains('3'), "{err}");
        let start = Instant::now();
        let err = run(&["sleep", "30"], &[], Duration::from_millis(200)).unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}

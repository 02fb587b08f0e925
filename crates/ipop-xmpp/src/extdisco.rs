//! External service discovery (XEP-0215): the STUN and TURN servers that the user's XMPP server
//! offers, with time-limited TURN credentials. The wire format is in `docs/protocol.md`.
//!
//! The answer is read by hand rather than with `tokio_xmpp::parsers::extdisco`: its typed
//! `Service` knows the types `stun` and `turn` only, so one `turns` entry (Prosody's
//! `mod_turn_external` sends one) would make the whole list fail, and its fields are private.
//! Every entry is checked on its own: a malformed one is counted and skipped, the others are kept.
//!
//! Everything here is pure except [`resolve`], which looks host names up.

use ipop_core::osn::{IceServer, IceServerKind, IceTransport};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};
use tokio_xmpp::minidom::{Element, rxml::xml_ncname};
use tokio_xmpp::parsers::date::DateTime;
use tokio_xmpp::parsers::extdisco::ServicesQuery;
use tokio_xmpp::parsers::ns;

/// At most this many services are taken from one answer; the rest are counted and dropped.
pub const MAX_SERVICES: usize = 16;
/// Longest host name (RFC 1035).
const MAX_HOST: usize = 253;
/// Longest TURN username or password.
const MAX_CREDENTIAL: usize = 512;
/// Longest `expires` attribute.
const MAX_DATE: usize = 64;
/// How long looking up one host name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Credentials are renewed at 80 % of their remaining lifetime, and at least this long before
/// they expire …
const RENEW_MARGIN: Duration = Duration::from_secs(30);
/// … but never sooner than this after the last answer (short lifetimes, skewed clocks) …
const RENEW_MIN: Duration = Duration::from_secs(10);
/// … and never later than this.
const RENEW_MAX: Duration = Duration::from_secs(24 * 3600);

/// The request: `<services xmlns='urn:xmpp:extdisco:2'/>`, all types.
pub fn query() -> Element {
    ServicesQuery { type_: None }.into()
}

/// A service type of the XEP-0215 registry that ipop uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Stun,
    /// STUN over TLS.
    Stuns,
    Turn,
    /// TURN over TLS.
    Turns,
}

impl Type {
    fn parse(s: &str) -> Option<Type> {
        match s {
            "stun" => Some(Type::Stun),
            "stuns" => Some(Type::Stuns),
            "turn" => Some(Type::Turn),
            "turns" => Some(Type::Turns),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Type::Stun => "stun",
            Type::Stuns => "stuns",
            Type::Turn => "turn",
            Type::Turns => "turns",
        }
    }

    fn kind(self) -> IceServerKind {
        match self {
            Type::Stun | Type::Stuns => IceServerKind::Stun,
            Type::Turn | Type::Turns => IceServerKind::Turn,
        }
    }

    /// RFC 8489 / RFC 8656: 3478, and 5349 over TLS.
    fn default_port(self) -> u16 {
        match self {
            Type::Stun | Type::Turn => 3478,
            Type::Stuns | Type::Turns => 5349,
        }
    }
}

/// TURN long-term credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// One service as offered, not yet resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    pub type_: Type,
    pub transport: IceTransport,
    /// A host name or an IP address, as the server wrote it.
    pub host: String,
    pub port: u16,
    pub credentials: Option<Credentials>,
    /// When the credentials expire.
    pub expires: Option<SystemTime>,
    /// The service needs credentials, to be asked for with `<credentials/>` when absent.
    pub restricted: bool,
}

impl Offered {
    /// The service's own name for logs and messages: `turn tcp example.org:3478`.
    fn label(&self) -> String {
        format!("{} {}", self.type_.as_str(), self.endpoint())
    }

    fn endpoint(&self) -> String {
        match literal(&self.host) {
            Some(ip) => SocketAddr::new(ip, self.port).to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }

    /// Whether `other` names the same service (type, host and port).
    fn same_service(&self, other: &Offered) -> bool {
        self.type_ == other.type_
            && self.port == other.port
            && self.host.eq_ignore_ascii_case(&other.host)
    }
}

/// What one `<services/>` or `<credentials/>` answer offers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// At most [`MAX_SERVICES`], in the server's order.
    pub services: Vec<Offered>,
    /// `<service/>` entries that break the rules (no type, bad host, port, credentials or
    /// date); each was logged.
    pub malformed: usize,
    /// Usable entries beyond [`MAX_SERVICES`].
    pub over_limit: usize,
}

/// Reads a `<services/>` or `<credentials/>` answer. Fails only when the payload is neither;
/// malformed entries are counted in the [`Offer`].
pub fn parse(payload: &Element) -> Result<Offer, String> {
    if !(payload.is("services", ns::EXT_DISCO) || payload.is("credentials", ns::EXT_DISCO)) {
        return Err(format!(
            "expected {{{}}}services, got {{{}}}{}",
            ns::EXT_DISCO,
            payload.ns(),
            payload.name()
        ));
    }
    let mut offer = Offer::default();
    // Children in other namespaces are extensions: ignored.
    for child in payload
        .children()
        .filter(|c| c.is("service", ns::EXT_DISCO))
    {
        match parse_service(child) {
            Ok(Some(service)) if offer.services.len() < MAX_SERVICES => {
                offer.services.push(service);
            }
            Ok(Some(_)) => offer.over_limit += 1,
            Ok(None) => {}
            Err(why) => {
                tracing::debug!("external service entry dropped: {why}");
                offer.malformed += 1;
            }
        }
    }
    Ok(offer)
}

/// One `<service/>`: `Ok(None)` for a type or transport ipop does not use (skipped, not an error:
/// the registry has more), `Err` for an entry that breaks the rules.
fn parse_service(el: &Element) -> Result<Option<Offered>, String> {
    let type_name = el.attr("type").ok_or("a service without a type")?;
    let Some(type_) = Type::parse(type_name) else {
        tracing::debug!("external service of type {:?} ignored", bounded(type_name));
        return Ok(None);
    };
    let transport = match (type_, el.attr("transport")) {
        (Type::Stun | Type::Turn, None | Some("udp")) => IceTransport::Udp,
        (Type::Stun | Type::Turn, Some("tcp")) => IceTransport::Tcp,
        (Type::Stuns | Type::Turns, None | Some("tcp")) => IceTransport::Tls,
        (_, Some(other)) => {
            // DTLS (`turns` over UDP), SCTP, …
            tracing::debug!(
                "external {} service over {:?} ignored",
                type_.as_str(),
                bounded(other)
            );
            return Ok(None);
        }
    };
    let host = el.attr("host").ok_or("a service without a host")?;
    if !valid_host(host) {
        return Err(format!("invalid host {:?}", bounded(host)));
    }
    let port = match el.attr("port") {
        None => type_.default_port(),
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("invalid port {:?}", bounded(port)))?,
    };
    let credentials = match (el.attr("username"), el.attr("password")) {
        (None, None) => None,
        (Some(username), Some(password)) => {
            if !valid_credential(username) || !valid_credential(password) {
                return Err(format!(
                    "credentials for {host} too long, empty or with control characters"
                ));
            }
            Some(Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
            })
        }
        _ => return Err(format!("a username without a password or back for {host}")),
    };
    let expires = match el.attr("expires") {
        None => None,
        Some(date) => {
            Some(parse_date(date).ok_or_else(|| format!("invalid expires {:?}", bounded(date)))?)
        }
    };
    let restricted = match el.attr("restricted") {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => return Err(format!("invalid restricted {:?}", bounded(other))),
    };
    Ok(Some(Offered {
        type_,
        transport,
        host: host.to_owned(),
        port,
        credentials,
        expires,
        restricted,
    }))
}

/// At most 64 characters of an attribute, for messages.
fn bounded(s: &str) -> String {
    s.chars().take(64).collect()
}

/// An IP address, bare or in brackets (`[2001:db8::1]`).
fn literal(host: &str) -> Option<IpAddr> {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
}

/// An IP address or a DNS name: labels of 1–63 letters, digits, `-` or `_`, not starting or
/// ending with `-`, 253 bytes at most.
fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > MAX_HOST {
        return false;
    }
    if literal(host).is_some() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn valid_credential(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_CREDENTIAL && !s.chars().any(char::is_control)
}

/// An XEP-0082 date-time as a point on our clock; before 1970 counts as 1970.
fn parse_date(s: &str) -> Option<SystemTime> {
    if s.len() > MAX_DATE {
        return None;
    }
    let date: DateTime = s.parse().ok()?;
    let seconds = u64::try_from(date.0.timestamp()).unwrap_or(0);
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// A TURN entry without credentials takes those of a TURN entry on the same host: the same
/// server checks them on all its ports. Prosody 0.12's `mod_turn_external` gives credentials to
/// its `turn` entries only, not to the `turns` one on the same host.
pub fn share_credentials(services: &mut [Offered]) {
    for i in 0..services.len() {
        if services[i].type_.kind() != IceServerKind::Turn || services[i].credentials.is_some() {
            continue;
        }
        let donor = services
            .iter()
            .find(|d| {
                d.type_.kind() == IceServerKind::Turn
                    && d.credentials.is_some()
                    && d.host.eq_ignore_ascii_case(&services[i].host)
            })
            .map(|d| (d.credentials.clone(), d.expires));
        if let Some((credentials, expires)) = donor {
            services[i].credentials = credentials;
            services[i].expires = expires;
        }
    }
}

/// The `<credentials/>` request for the restricted TURN services that came without
/// credentials, if there are any.
pub fn credentials_request(services: &[Offered]) -> Option<Element> {
    let wanted: Vec<Element> = services
        .iter()
        .filter(|s| needs_credentials(s))
        .map(|s| {
            Element::builder("service", ns::EXT_DISCO)
                .attr(xml_ncname!("type").into(), s.type_.as_str())
                .attr(xml_ncname!("host").into(), s.host.as_str())
                .attr(xml_ncname!("port").into(), s.port.to_string())
                .build()
        })
        .collect();
    (!wanted.is_empty()).then(|| {
        Element::builder("credentials", ns::EXT_DISCO)
            .append_all(wanted)
            .build()
    })
}

fn needs_credentials(service: &Offered) -> bool {
    service.type_.kind() == IceServerKind::Turn
        && service.restricted
        && service.credentials.is_none()
}

/// Fills in the credentials that a `<credentials/>` answer gave, matched by type, host and
/// port.
pub fn apply_credentials(services: &mut [Offered], answer: &[Offered]) {
    for service in services.iter_mut().filter(|s| needs_credentials(s)) {
        if let Some(given) = answer
            .iter()
            .find(|a| a.same_service(service) && a.credentials.is_some())
        {
            service.credentials = given.credentials.clone();
            service.expires = given.expires;
        }
    }
}

/// Drops the restricted TURN services still without credentials: nobody can use them.
pub fn usable(services: Vec<Offered>) -> Vec<Offered> {
    services
        .into_iter()
        .filter(|s| {
            let keep = !needs_credentials(s);
            if !keep {
                tracing::debug!("{} needs credentials the server did not give", s.label());
            }
            keep
        })
        .collect()
}

/// A service resolved to one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub server: IceServer,
    /// When its credentials expire.
    pub expires: Option<SystemTime>,
}

/// The services with addresses, and the host names that did not resolve.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    pub servers: Vec<Resolved>,
    pub unresolved: BTreeSet<String>,
}

/// Looks the host names up (IP addresses need no lookup), each within 5 s.
pub async fn resolve(services: Vec<Offered>) -> Resolution {
    let names: BTreeSet<&str> = services
        .iter()
        .filter(|s| literal(&s.host).is_none())
        .map(|s| s.host.as_str())
        .collect();
    let lookups = names.into_iter().map(|host| async move {
        let found =
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
                Ok(Ok(addresses)) => addresses.map(|a| a.ip()).collect(),
                Ok(Err(e)) => {
                    tracing::warn!(host, "cannot resolve the STUN/TURN server's name: {e}");
                    Vec::new()
                }
                Err(_) => {
                    tracing::warn!(
                        host,
                        "cannot resolve the STUN/TURN server's name within {RESOLVE_TIMEOUT:?}"
                    );
                    Vec::new()
                }
            };
        (host.to_owned(), found)
    });
    let addresses: HashMap<String, Vec<IpAddr>> = futures::future::join_all(lookups)
        .await
        .into_iter()
        .collect();
    servers(&services, &addresses)
}

/// The services at their addresses: one per address family (the first IPv4 and the first IPv6
/// address of a name), in the server's order.
fn servers(services: &[Offered], addresses: &HashMap<String, Vec<IpAddr>>) -> Resolution {
    let mut resolution = Resolution::default();
    for service in services {
        let ips: Vec<IpAddr> = match literal(&service.host) {
            Some(ip) => vec![ip],
            None => {
                let found = addresses.get(&service.host).map_or(&[][..], Vec::as_slice);
                let v4 = found.iter().find(|ip| ip.is_ipv4());
                let v6 = found.iter().find(|ip| ip.is_ipv6());
                v4.into_iter().chain(v6).copied().collect()
            }
        };
        if ips.is_empty() {
            resolution.unresolved.insert(service.host.clone());
        }
        for ip in ips {
            resolution.servers.push(Resolved {
                server: IceServer {
                    kind: service.type_.kind(),
                    host: service.host.clone(),
                    address: SocketAddr::new(ip, service.port),
                    transport: service.transport,
                    username: service.credentials.as_ref().map(|c| c.username.clone()),
                    password: service.credentials.as_ref().map(|c| c.password.clone()),
                },
                expires: service.expires,
            });
        }
    }
    resolution
}

/// How long to wait before asking for fresh credentials: 80 % of the shortest remaining
/// lifetime, at least 30 s before it ends, between 10 s and a day. `None` when nothing expires.
pub fn renew_delay(servers: &[Resolved], now: SystemTime) -> Option<Duration> {
    let earliest = servers.iter().filter_map(|s| s.expires).min()?;
    let left = earliest.duration_since(now).unwrap_or(Duration::ZERO);
    let delay = (left.saturating_mul(4) / 5).min(left.saturating_sub(RENEW_MARGIN));
    Some(delay.clamp(RENEW_MIN, RENEW_MAX))
}

/// Removes the servers whose credentials have expired; whether any was.
pub fn prune_expired(servers: &mut Vec<Resolved>, now: SystemTime) -> bool {
    let before = servers.len();
    servers.retain(|s| s.expires.is_none_or(|e| e > now));
    servers.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn el(xml: &str) -> Element {
        xml.parse().expect("test XML parses")
    }

    fn services(inner: &str) -> Element {
        el(&format!(
            "<services xmlns='urn:xmpp:extdisco:2'>{inner}</services>"
        ))
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn offered(type_: Type, host: &str, port: u16) -> Offered {
        Offered {
            type_,
            transport: match type_ {
                Type::Stuns | Type::Turns => IceTransport::Tls,
                _ => IceTransport::Udp,
            },
            host: host.to_owned(),
            port,
            credentials: None,
            expires: None,
            restricted: false,
        }
    }

    fn credentials(username: &str) -> Option<Credentials> {
        Some(Credentials {
            username: username.to_owned(),
            password: format!("pw-{username}"),
        })
    }

    #[test]
    fn prosody_answer_is_read() {
        // As Prosody 0.12 with mod_turn_external (tcp and a TLS port) answers.
        let offer = parse(&services(
            "<service type='stun' transport='udp' host='192.0.2.1' port='3478'/>\
             <service type='stun' transport='tcp' host='192.0.2.1' port='3478'/>\
             <service type='turn' transport='udp' host='192.0.2.1' port='3478' \
               username='1700000040:ipop' password='c2VjcmV0' \
               expires='2023-11-14T22:14:00Z' restricted='1'/>\
             <service type='turn' transport='tcp' host='turn.example.org' port='3478' \
               username='1700000040:ipop' password='c2VjcmV0' \
               expires='2023-11-14T22:14:00Z' restricted='1'/>\
             <service type='turns' transport='tcp' host='192.0.2.1' port='5349'/>",
        ))
        .expect("services");
        assert_eq!((offer.malformed, offer.over_limit), (0, 0));
        let s = &offer.services;
        assert_eq!(s.len(), 5);
        assert_eq!(
            (s[0].type_, s[0].transport, s[0].port),
            (Type::Stun, IceTransport::Udp, 3478)
        );
        assert_eq!(s[1].transport, IceTransport::Tcp);
        assert_eq!(
            s[2].credentials,
            credentials_pair("1700000040:ipop", "c2VjcmV0")
        );
        assert_eq!(s[2].expires, Some(at(1_700_000_040)));
        assert!(s[2].restricted);
        assert_eq!(
            (s[3].host.as_str(), s[3].transport),
            ("turn.example.org", IceTransport::Tcp)
        );
        assert_eq!(
            (s[4].type_, s[4].transport, s[4].credentials.clone()),
            (Type::Turns, IceTransport::Tls, None)
        );
    }

    fn credentials_pair(username: &str, password: &str) -> Option<Credentials> {
        Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }

    #[test]
    fn defaults_apply_and_other_types_are_skipped_without_counting() {
        let offer = parse(&services(
            "<service type='turn' host='turn.example.org'/>\
             <service type='stuns' host='stun.example.org'/>\
             <service type='ftp' host='ftp.example.org' port='21'/>\
             <service type='turns' transport='udp' host='dtls.example.org'/>\
             <service type='stun' transport='sctp' host='sctp.example.org'/>\
             <other xmlns='urn:example' type='turn' host='evil..'/>",
        ))
        .expect("services");
        assert_eq!((offer.malformed, offer.over_limit), (0, 0));
        let got: Vec<(Type, IceTransport, u16)> = offer
            .services
            .iter()
            .map(|s| (s.type_, s.transport, s.port))
            .collect();
        assert_eq!(
            got,
            vec![
                (Type::Turn, IceTransport::Udp, 3478),
                (Type::Stuns, IceTransport::Tls, 5349)
            ]
        );
    }

    #[test]
    fn hostile_entries_are_counted_and_the_rest_kept() {
        let long = "a".repeat(600);
        let bad = [
            "<service host='192.0.2.1'/>".to_owned(),
            "<service type='turn'/>".to_owned(),
            "<service type='turn' host=''/>".to_owned(),
            "<service type='turn' host='exa mple.org'/>".to_owned(),
            "<service type='turn' host='a..b'/>".to_owned(),
            "<service type='turn' host='-a.example'/>".to_owned(),
            "<service type='turn' host='a/b'/>".to_owned(),
            format!("<service type='turn' host='{}'/>", "a.".repeat(130)),
            format!("<service type='turn' host='{}.org'/>", "b".repeat(64)),
            "<service type='turn' host='h.example' port='0'/>".to_owned(),
            "<service type='turn' host='h.example' port='65536'/>".to_owned(),
            "<service type='turn' host='h.example' port='-1'/>".to_owned(),
            "<service type='turn' host='h.example' port='x'/>".to_owned(),
            "<service type='turn' host='h.example' username='u'/>".to_owned(),
            "<service type='turn' host='h.example' password='p'/>".to_owned(),
            "<service type='turn' host='h.example' username='' password='p'/>".to_owned(),
            format!("<service type='turn' host='h.example' username='{long}' password='p'/>"),
            format!("<service type='turn' host='h.example' username='u' password='{long}'/>"),
            "<service type='turn' host='h.example' username='u&#10;v' password='p'/>".to_owned(),
            "<service type='turn' host='h.example' expires='tomorrow'/>".to_owned(),
            format!(
                "<service type='turn' host='h.example' expires='2023-11-14T22:14:00{}Z'/>",
                "0".repeat(100)
            ),
            "<service type='turn' host='h.example' restricted='maybe'/>".to_owned(),
        ];
        let good = "<service type='stun' host='[2001:db8::1]' port='3478'/>\
                    <service type='turn' host='turn.example.org.' \
                      expires='1960-01-01T00:00:00Z'/>";
        let offer = parse(&services(&format!("{}{good}", bad.concat()))).expect("services");
        assert_eq!(offer.malformed, bad.len());
        assert_eq!(offer.services.len(), 2);
        assert_eq!(offer.services[1].expires, Some(SystemTime::UNIX_EPOCH));
    }

    #[test]
    fn at_most_sixteen_services_are_taken() {
        let many: String = (0..100)
            .map(|i| format!("<service type='stun' host='192.0.2.{i}'/>"))
            .collect();
        let offer = parse(&services(&many)).expect("services");
        assert_eq!(offer.services.len(), MAX_SERVICES);
        assert_eq!(offer.over_limit, 100 - MAX_SERVICES);
        assert_eq!(offer.services[15].host, "192.0.2.15");
    }

    #[test]
    fn only_services_or_credentials_are_answers() {
        assert!(parse(&el("<services xmlns='urn:xmpp:extdisco:1'/>")).is_err());
        assert!(parse(&el("<query xmlns='jabber:iq:roster'/>")).is_err());
        assert_eq!(
            parse(&el("<credentials xmlns='urn:xmpp:extdisco:2'/>")),
            Ok(Offer::default())
        );
        assert_eq!(
            Element::from(ServicesQuery { type_: None }),
            el("<services xmlns='urn:xmpp:extdisco:2'/>")
        );
        assert_eq!(query(), el("<services xmlns='urn:xmpp:extdisco:2'/>"));
    }

    #[test]
    fn turn_over_tls_borrows_the_credentials_of_turn_on_the_same_host() {
        let mut turn = offered(Type::Turn, "Turn.Example.org", 3478);
        turn.credentials = credentials("1700000040");
        turn.expires = Some(at(1_700_000_040));
        let mut list = vec![
            offered(Type::Turns, "turn.example.org", 5349),
            turn,
            offered(Type::Turns, "other.example.org", 5349),
            offered(Type::Stun, "turn.example.org", 3478),
        ];
        share_credentials(&mut list);
        assert_eq!(list[0].credentials, credentials("1700000040"));
        assert_eq!(list[0].expires, Some(at(1_700_000_040)));
        assert_eq!(list[2].credentials, None);
        assert_eq!(list[3].credentials, None);
    }

    #[test]
    fn restricted_turn_without_credentials_asks_for_them() {
        let mut restricted = offered(Type::Turn, "turn.example.org", 3478);
        restricted.restricted = true;
        let mut list = vec![
            offered(Type::Stun, "stun.example.org", 3478),
            restricted.clone(),
            Offered {
                port: 3479,
                ..restricted.clone()
            },
        ];
        assert_eq!(credentials_request(&list[..1]), None);
        let request = credentials_request(&list).expect("a request");
        assert_eq!(
            request,
            el("<credentials xmlns='urn:xmpp:extdisco:2'>\
                  <service type='turn' host='turn.example.org' port='3478'/>\
                  <service type='turn' host='turn.example.org' port='3479'/>\
                </credentials>")
        );
        let answer = parse(&el("<credentials xmlns='urn:xmpp:extdisco:2'>\
               <service type='turn' host='TURN.example.org' port='3478' username='u' \
                 password='p' expires='2023-11-14T22:14:00Z'/>\
               <service type='turn' host='turn.example.org' port='9999' username='x' \
                 password='y'/>\
             </credentials>"))
        .expect("credentials");
        apply_credentials(&mut list, &answer.services);
        assert_eq!(list[1].credentials, credentials_pair("u", "p"));
        assert_eq!(list[1].expires, Some(at(1_700_000_040)));
        assert_eq!(list[2].credentials, None);
        let kept = usable(list);
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[1].port, 3478);
    }

    #[test]
    fn services_get_one_address_per_family() {
        let mut turn = offered(Type::Turn, "turn.example.org", 3478);
        turn.credentials = credentials("1700000040");
        turn.expires = Some(at(1_700_000_040));
        let list = vec![
            offered(Type::Stun, "192.0.2.1", 3478),
            offered(Type::Stun, "[2001:db8::1]", 3478),
            turn,
            offered(Type::Stun, "gone.example.org", 3478),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().expect("IP");
        let addresses = HashMap::from([
            (
                "turn.example.org".to_owned(),
                vec![
                    ip("2001:db8::2"),
                    ip("192.0.2.2"),
                    ip("192.0.2.3"),
                    ip("2001:db8::3"),
                ],
            ),
            ("gone.example.org".to_owned(), vec![]),
        ]);
        let resolution = servers(&list, &addresses);
        let got: Vec<(String, IceServerKind, Option<&str>)> = resolution
            .servers
            .iter()
            .map(|r| {
                (
                    r.server.address.to_string(),
                    r.server.kind,
                    r.server.username.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("192.0.2.1:3478".to_owned(), IceServerKind::Stun, None),
                ("[2001:db8::1]:3478".to_owned(), IceServerKind::Stun, None),
                (
                    "192.0.2.2:3478".to_owned(),
                    IceServerKind::Turn,
                    Some("1700000040")
                ),
                (
                    "[2001:db8::2]:3478".to_owned(),
                    IceServerKind::Turn,
                    Some("1700000040")
                ),
            ]
        );
        assert_eq!(
            resolution.servers[2].server.password.as_deref(),
            Some("pw-1700000040")
        );
        assert_eq!(resolution.servers[2].server.host, "turn.example.org");
        assert_eq!(resolution.servers[2].expires, Some(at(1_700_000_040)));
        assert_eq!(
            resolution.unresolved,
            BTreeSet::from(["gone.example.org".to_owned()])
        );
    }

    #[tokio::test]
    async fn literal_addresses_need_no_lookup() {
        let resolution = resolve(vec![offered(Type::Stun, "192.0.2.1", 3478)]).await;
        assert_eq!(resolution.servers.len(), 1);
        assert!(resolution.unresolved.is_empty());
    }

    fn expiring(expires: Option<u64>) -> Resolved {
        Resolved {
            server: IceServer {
                kind: IceServerKind::Turn,
                host: "192.0.2.1".to_owned(),
                address: "192.0.2.1:3478".parse().expect("address"),
                transport: IceTransport::Udp,
                username: None,
                password: None,
            },
            expires: expires.map(at),
        }
    }

    #[test]
    fn credentials_are_renewed_well_before_they_expire() {
        let now = at(1_000_000);
        let delay = |expires: &[Option<u64>]| {
            let list: Vec<Resolved> = expires.iter().map(|e| expiring(*e)).collect();
            renew_delay(&list, now).map(|d| d.as_secs())
        };
        assert_eq!(delay(&[]), None);
        assert_eq!(delay(&[None]), None);
        // 40 s left: 30 s before the end.
        assert_eq!(delay(&[Some(1_000_040)]), Some(10));
        // 10 min left: at 80 %.
        assert_eq!(delay(&[Some(1_000_600), None]), Some(480));
        // The earliest counts.
        assert_eq!(delay(&[Some(1_086_400), Some(1_000_600)]), Some(480));
        // Almost or already expired (a skewed clock): not sooner than 10 s.
        assert_eq!(delay(&[Some(1_000_020)]), Some(10));
        assert_eq!(delay(&[Some(5)]), Some(10));
        // Far away: at least once a day.
        assert_eq!(delay(&[Some(253_402_300_799)]), Some(86_400));
    }

    #[test]
    fn expired_credentials_are_pruned() {
        let mut list = vec![expiring(None), expiring(Some(10)), expiring(Some(30))];
        assert!(!prune_expired(&mut list, at(5)));
        assert!(prune_expired(&mut list, at(20)));
        assert_eq!(list, vec![expiring(None), expiring(Some(30))]);
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        let shown = format!("{:?}", credentials_pair("user", "secret-pw"));
        assert!(
            shown.contains("user") && !shown.contains("secret-pw"),
            "{shown}"
        );
    }
}

#[cfg(test)]
mod documented {
    use super::*;

    /// The XEP-0215 examples in `docs/protocol.md` read as the document says.
    #[test]
    fn the_examples_in_the_protocol_document_read_as_documented() {
        let doc = include_str!("../../../docs/protocol.md");
        let payloads: Vec<Element> = doc
            .split("```xml")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .flat_map(|block| block.split("</iq>"))
            .filter_map(|iq| {
                let start = iq.find("<services").or_else(|| iq.find("<credentials"))?;
                // One line, without the white space between elements.
                let xml = iq[start..]
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
                    .replace("> <", "><");
                Some(xml.trim().parse().expect("example is well-formed"))
            })
            .collect();
        assert_eq!(
            payloads.len(),
            4,
            "query, answer, credentials request and answer"
        );
        assert_eq!(payloads[0], query());
        let offer = parse(&payloads[1]).expect("the answer");
        assert_eq!((offer.malformed, offer.over_limit), (0, 0));
        let mut services = offer.services;
        assert_eq!(services.len(), 5);
        share_credentials(&mut services);
        assert!(
            services[4].credentials.is_some(),
            "turns takes turn's credentials"
        );
        assert_eq!(credentials_request(&services), None);
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_040);
        assert_eq!(services[2].expires, Some(expires));
        // The password is base64(HMAC-SHA1("secret", username)), as the document says.
        let given = services[2].credentials.clone().expect("credentials");
        let mut mac = <hmac::Hmac<sha1::Sha1> as hmac::Mac>::new_from_slice(b"secret")
            .expect("any key length");
        hmac::Mac::update(&mut mac, given.username.as_bytes());
        let expected = hmac::Mac::finalize(mac).into_bytes();
        assert_eq!(
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, expected),
            given.password
        );

        let mut restricted = services[2].clone();
        restricted.credentials = None;
        let mut wanted = vec![restricted];
        assert_eq!(credentials_request(&wanted).as_ref(), Some(&payloads[2]));
        let answer = parse(&payloads[3]).expect("the credentials");
        apply_credentials(&mut wanted, &answer.services);
        assert_eq!(wanted[0], services[2]);
    }
}

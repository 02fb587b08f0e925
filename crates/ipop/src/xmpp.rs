//! Wiring of the XMPP binding into the daemon: the session, its events into the data plane's
//! engine, the engine's signals out to the session, and the group commands of `ipop group`.

use crate::config::{Config, Tls};
use crate::control::Request;
use crate::dataplane::{OsnChannel, XmppInfoFn};
use crate::overlays::Announcer;
use crate::status::{RoomInfo, XmppInfo};
use anyhow::Context;
use ipop_core::PublicKey;
use ipop_core::osn::{Claim, OverlayId};
use ipop_xmpp::{GroupConfig, Session, XmppConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the first login may take before `ipop up` gives up with the reason. The roster and
/// the rooms may take longer: `ipop up` then warns and goes on.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(12);

/// This machine's host name: the default device name.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ipop".to_owned())
}

/// The binding's settings from the config file.
pub(crate) fn settings(config: &Config, key: PublicKey) -> anyhow::Result<Option<XmppConfig>> {
    let Some(x) = &config.xmpp else {
        return Ok(None);
    };
    let client_cert = match (&x.client_cert, &x.client_key) {
        (Some(cert), Some(key)) => Some(ipop_xmpp::ClientCertificate {
            cert: config.resolve(cert),
            key: config.resolve(key),
        }),
        _ => None,
    };
    let password = match client_cert {
        Some(_) => String::new(),
        None => config.xmpp_password(x)?,
    };
    let device = x.device.clone().unwrap_or_else(host_name);
    let mut cfg = XmppConfig::new(x.jid.clone(), password, device, key);
    cfg.server = x.server.as_ref().and_then(|s| {
        let (host, port) = s.rsplit_once(':')?;
        Some((host.trim_matches(['[', ']']).to_owned(), port.parse().ok()?))
    });
    cfg.direct_tls = x.tls == Tls::Direct;
    cfg.extra_ca = x.ca_file.as_ref().map(|p| config.resolve(p));
    cfg.client_cert = client_cert;
    cfg.social = config.social.as_ref().is_some_and(|s| s.enabled);
    let advertised = |id: &OverlayId| {
        config
            .overlays()
            .into_iter()
            .find(|o| &o.id == id)
            .map(|o| o.advertise)
            .unwrap_or_default()
    };
    cfg.social_routes = advertised(&OverlayId::Social);
    // An exit forwards its peers' DNS queries when its responder runs.
    let exit = config
        .overlays()
        .iter()
        .any(ipop_core::OverlayConfig::is_exit);
    cfg.exit_dns = (exit && config.dns.enabled).then_some(config.dns.port);
    cfg.groups = config
        .groups
        .iter()
        .map(|g| GroupConfig {
            room: g.room.clone(),
            create: g.create,
            claim: None,
            routes: advertised(&OverlayId::Group(g.room.clone())),
        })
        .collect();
    cfg.login_timeout = LOGIN_TIMEOUT;
    cfg.send_rate = x.send_rate;
    cfg.send_burst = x.send_burst;
    Ok(Some(cfg))
}

/// A running binding: the session, shared with the control commands.
pub struct Binding {
    session: Arc<Session>,
}

/// Logs in when the config names an account. Fails with the binding's reason (wrong password,
/// unreachable server, refused certificate, …) within the login timeout.
pub async fn start(
    config: &Config,
    key: PublicKey,
    claims: &[(OverlayId, Claim)],
    relay: Option<ipop_core::osn::RelayOffer>,
) -> anyhow::Result<Option<(Binding, OsnChannel)>> {
    let Some(mut cfg) = settings(config, key)? else {
        return Ok(None);
    };
    cfg.relay = relay;
    let claim = |overlay: &OverlayId| claims.iter().find(|(o, _)| o == overlay).map(|(_, c)| *c);
    cfg.social_claim = claim(&OverlayId::Social);
    for g in &mut cfg.groups {
        g.claim = claim(&OverlayId::Group(g.room.clone()));
    }
    let jid = cfg.jid.clone();
    tracing::info!(%jid, device = %cfg.device, "logging in to XMPP");
    let (session, events) = ipop_xmpp::connect(cfg)
        .await
        .with_context(|| format!("XMPP login as {jid} failed"))?;
    let session = Arc::new(session);
    let (signals, mut outgoing) = mpsc::unbounded_channel();
    // The tasks hold the session weakly, so that shutdown can take it back.
    let sender = Arc::downgrade(&session);
    tokio::spawn(async move {
        while let Some(out) = outgoing.recv().await {
            match sender.upgrade() {
                Some(session) => session.send(out),
                None => return,
            }
        }
    });
    Ok(Some((Binding { session }, OsnChannel { events, signals })))
}

impl Binding {
    /// What `ipop status` shows of the session.
    pub fn info(&self) -> XmppInfoFn {
        let session = self.session.clone();
        Box::new(move || {
            let s = session.status();
            let t = s.traffic;
            XmppInfo {
                state: match s.state {
                    ipop_xmpp::State::Connecting => "connecting",
                    ipop_xmpp::State::Online => "online",
                    ipop_xmpp::State::Reconnecting => "reconnecting",
                    ipop_xmpp::State::Closed => "closed",
                }
                .to_owned(),
                jid: s.bound,
                server: Some(s.server),
                reconnects: s.reconnects,
                resumptions: s.resumptions,
                drops: s
                    .drops
                    .iter()
                    .map(|(reason, n)| (reason.as_str().to_owned(), *n))
                    .collect(),
                stanzas_sent: t.stanzas_sent,
                stanzas_received: t.stanzas_received,
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
                signals_sent: t.signals_sent,
                signals_received: t.signals_received,
                link_offers: t.offers_sent,
                link_offers_repeated: t.offers_repeated,
                signal_failures: BTreeMap::from([
                    ("refused".to_owned(), t.signals_refused),
                    ("timeout".to_owned(), t.signals_timed_out),
                    ("unsent".to_owned(), t.signals_unsent),
                ]),
                signals_coalesced: t.signals_coalesced,
                send_queue: t.send_queue,
                send_wait_max_ms: t.send_wait_max_ms,
                rooms: s
                    .rooms
                    .into_iter()
                    .map(|r| RoomInfo {
                        room: r.room,
                        joined: r.joined,
                        problem: r.problem,
                    })
                    .collect(),
            }
        })
    }

    /// Where the data plane announces this device's address when it moves.
    /// Reads the XMPP server's address on the current connection.
    pub fn server_ip(&self) -> Box<dyn Fn() -> Option<std::net::IpAddr> + Send> {
        let session = self.session.clone();
        Box::new(move || session.server_ip())
    }

    pub fn announcer(&self) -> Announcer {
        let (tx, mut rx) = mpsc::unbounded_channel::<(OverlayId, Option<Claim>)>();
        let session = Arc::downgrade(&self.session);
        tokio::spawn(async move {
            while let Some((overlay, claim)) = rx.recv().await {
                match session.upgrade() {
                    Some(session) => session.announce(overlay, claim),
                    None => return,
                }
            }
        });
        tx
    }

    /// Serves `group add|remove ROOM JID` and hands every other request to `rest`.
    pub fn route_commands(
        &self,
        mut requests: mpsc::Receiver<Request>,
        rest: mpsc::Sender<Request>,
    ) {
        let session = Arc::downgrade(&self.session);
        tokio::spawn(async move {
            while let Some(req) = requests.recv().await {
                let words: Vec<&str> = req.command.split_whitespace().collect();
                match words.as_slice() {
                    ["group", verb @ ("add" | "remove"), room, jid] => {
                        let (verb, room, jid) =
                            (verb.to_string(), room.to_string(), jid.to_string());
                        let Some(session) = session.upgrade() else {
                            return;
                        };
                        tokio::spawn(async move {
                            let result = if verb == "add" {
                                session.add_member(&room, &jid).await
                            } else {
                                session.remove_member(&room, &jid).await
                            };
                            let answer = match result {
                                Ok(()) => serde_json::json!({ "ok": true }),
                                Err(e) => serde_json::json!({ "error": e.to_string() }),
                            };
                            let _ = req.reply.send(answer.to_string());
                        });
                    }
                    _ => {
                        if rest.send(req).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Leaves the rooms and closes the session.
    pub async fn shutdown(self) {
        match Arc::try_unwrap(self.session) {
            Ok(session) => session.shutdown().await,
            Err(_) => tracing::debug!("a group command is still running; closing without waiting"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bindings_settings_leave_the_password_out_of_debug() {
        let config = Config::parse(
            "[xmpp]\njid = \"alice@example.org\"\npassword = \"xmpp-secret-3\"\n[social]\n",
        )
        .expect("config");
        let settings = settings(&config, PublicKey([7; 32]))
            .expect("settings")
            .expect("an account");
        assert_eq!(settings.password, "xmpp-secret-3");
        let debug = format!("{settings:?}");
        assert!(
            !debug.contains("xmpp-secret-3") && debug.contains("alice@example.org"),
            "{debug}"
        );
    }
}

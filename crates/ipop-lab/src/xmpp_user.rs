//! A scripted XMPP user for end-to-end tests: what a person does in a chat client (log in,
//! befriend, chat, manage a group room), with a blocking API.
//!
//! Each user owns a small tokio runtime. A driver task owns a tokio-xmpp [`StanzaStream`]: it
//! always drains the stream's events (so IQ replies keep flowing, see tokio-xmpp's bounded
//! queues), matches IQ responses to their requests, answers roster pushes and pings like a
//! client, re-sends presence after a reconnection, and queues every other stanza for the test,
//! which takes the ones it waits for.
//!
//! tokio-xmpp's `Client` is not used: its worker reads the stanza stream through a
//! `StanzaReceiver`, whose `poll_next` returns `Pending` without registering a waker when the
//! mutex it shares with the sending half is held, and sending holds that mutex across an
//! `.await`. A stanza arriving while one is being sent can then leave the worker asleep for good.
//! Here one task owns the whole stream, sending and receiving, with no lock in between.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::error::Elapsed;
use tokio_xmpp::jid::{BareJid, FullJid, Jid};
use tokio_xmpp::minidom::Element;
use tokio_xmpp::minidom::rxml::NcName;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::message::{Id, Lang, Message, MessageType};
use tokio_xmpp::parsers::muc::{Muc, MucUser, user::Status};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::presence::{Presence, Type as PresenceType};
use tokio_xmpp::parsers::roster::{Ask, Item as RosterItem, Roster, Subscription};
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, ErrorType, StanzaError};
use tokio_xmpp::stanzastream::{
    Event, StanzaStage, StanzaState, StanzaStream, StanzaToken, StreamEvent,
};
use tokio_xmpp::{IqRequest, IqResponse, Stanza};

use crate::netns::Netns;
use crate::nsenter::NsHandle;
use crate::server::XmppServer;
use crate::xmpp_tls::LabConnector;

/// How long [`XmppUserBuilder::connect`] waits for the first login.
pub const XMPP_LOGIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one step (a stanza to send, an IQ reply, a subscription request, a roster state)
/// may take by default; see [`XmppUserBuilder::step_timeout`].
pub const XMPP_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long dropping a user waits for the stream to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often roster states are polled.
const ROSTER_POLL: Duration = Duration::from_millis(100);

/// Stanzas the stanza stream queues each way (as tokio-xmpp's `Client` does).
const QUEUE_DEPTH: usize = 16;

const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const DATA_FORMS: &str = "jabber:x:data";
const ROOM_CONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";

/// A room occupant as seen when joining: the nickname and, in a non-anonymous room, the real
/// JID of the occupant's session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupant {
    pub nick: String,
    pub jid: Option<FullJid>,
}

/// Options for an [`XmppUser`]; [`XmppUserBuilder::connect`] logs in.
#[derive(Debug)]
pub struct XmppUserBuilder {
    jid: BareJid,
    password: String,
    resource: Option<String>,
    addr: SocketAddr,
    ca_der: Vec<u8>,
    conference: String,
    server_log: PathBuf,
    netns: Option<NsHandle>,
    priority: Option<i8>,
    login_timeout: Duration,
    step_timeout: Duration,
}

impl XmppUserBuilder {
    /// Binds this resource instead of one the server chooses.
    #[must_use]
    pub fn resource(mut self, resource: &str) -> XmppUserBuilder {
        self.resource = Some(resource.to_owned());
        self
    }

    /// Connects from inside `ns` (the TCP socket is opened there, also on reconnection).
    #[must_use]
    pub fn netns(mut self, ns: &Netns) -> XmppUserBuilder {
        self.netns = Some(NsHandle::of(ns));
        self
    }

    /// The priority of the initial presence; `None` sends no presence at login (the session
    /// then gets no presence, chat or subscription requests until [`XmppUser::set_presence`]).
    /// Default `Some(1)`, a chat client.
    #[must_use]
    pub fn initial_presence(mut self, priority: Option<i8>) -> XmppUserBuilder {
        self.priority = priority;
        self
    }

    #[must_use]
    pub fn login_timeout(mut self, timeout: Duration) -> XmppUserBuilder {
        self.login_timeout = timeout;
        self
    }

    /// How long each step may take (default [`XMPP_STEP_TIMEOUT`]).
    #[must_use]
    pub fn step_timeout(mut self, timeout: Duration) -> XmppUserBuilder {
        self.step_timeout = timeout;
        self
    }

    /// Logs in, fetches the roster and sends the initial presence, as a chat client does.
    ///
    /// # Panics
    /// When that fails; see [`XmppUserBuilder::try_connect`].
    #[must_use]
    pub fn connect(self) -> XmppUser {
        self.try_connect().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`XmppUserBuilder::connect`], but returns why the login did not happen (a wrong
    /// password, say, shows as no login within the timeout, as failed attempts are retried;
    /// the message gives the last attempt's error).
    ///
    /// # Errors
    /// When there is no login within the login timeout, or the roster or presence cannot be
    /// sent.
    pub fn try_connect(self) -> Result<XmppUser, String> {
        let login_jid: Jid = match &self.resource {
            Some(resource) => self
                .jid
                .with_resource_str(resource)
                .map_err(|e| format!("bad resource {resource:?}: {e}"))?
                .into(),
            None => self.jid.clone().into(),
        };
        let connector = LabConnector::new(self.addr, self.netns.clone(), &self.ca_der)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("xmpp-{}", self.jid))
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a tokio runtime: {e}"))?;
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (stanza_tx, stanza_rx) = mpsc::unbounded_channel();
        let (session_tx, session_rx) = watch::channel(Session::default());
        {
            let _guard = rt.enter();
            let stream = StanzaStream::new(
                connector
                    .clone()
                    .reconnector(login_jid, self.password.clone()),
                QUEUE_DEPTH,
            );
            let driver = Driver {
                stream,
                account: self.jid.clone(),
                stanzas: stanza_tx,
                session: session_tx,
                presence: None,
                iqs: HashMap::new(),
                ids: 0,
            };
            rt.spawn(driver.run(cmd_rx));
        }
        let mut user = XmppUser {
            jid: self.jid,
            conference: self.conference,
            server_log: self.server_log,
            step_timeout: self.step_timeout,
            cmds: cmd_tx,
            stanzas: stanza_rx,
            backlog: VecDeque::new(),
            session: session_rx,
            priority: None,
            rt: Some(rt),
        };
        let mut session = user.session.clone();
        let online = user.block_on_timeout(self.login_timeout, session.wait_for(|s| s.logins > 0));
        if !matches!(online, Ok(Ok(_))) {
            return Err(format!(
                "{} did not log in to {} within {:?} (wrong password or account missing? \
                 see the server log {}); last connection error: {}",
                user.jid,
                self.addr,
                self.login_timeout,
                user.server_log.display(),
                connector
                    .last_error()
                    .unwrap_or_else(|| "none recorded".to_owned())
            ));
        }
        user.try_iq(None, IqRequest::Get(roster_query()))?
            .map_err(|e| format!("{} cannot fetch its roster: {e}", user.jid))?;
        if let Some(priority) = self.priority {
            user.try_send(Presence::available().with_priority(priority).into())?;
            user.priority = Some(priority);
        }
        Ok(user)
    }
}

/// What the driver knows of the session.
#[derive(Clone, Debug, Default)]
struct Session {
    /// Logins so far (the first, then one per reconnection without resumption).
    logins: u32,
    bound: Option<FullJid>,
}

/// Where the response to an IQ request goes.
type IqReply = oneshot::Receiver<IqResponse>;

enum Command {
    /// Queues a stanza; answers with its token.
    Send(Box<Stanza>, oneshot::Sender<StanzaToken>),
    /// Queues an IQ request; answers with its token and where its response will arrive.
    Iq(
        Option<Jid>,
        IqRequest,
        oneshot::Sender<(StanzaToken, IqReply)>,
    ),
    Close(oneshot::Sender<()>),
}

/// A logged-in XMPP account session driven by a test. Dropping it closes the stream.
pub struct XmppUser {
    jid: BareJid,
    conference: String,
    server_log: PathBuf,
    step_timeout: Duration,
    cmds: mpsc::UnboundedSender<Command>,
    stanzas: mpsc::UnboundedReceiver<Stanza>,
    /// Stanzas received but not yet taken by a wait.
    backlog: VecDeque<Stanza>,
    session: watch::Receiver<Session>,
    /// The priority of the last available presence, if any.
    priority: Option<i8>,
    /// `Some` until dropped.
    rt: Option<Runtime>,
}

impl fmt::Debug for XmppUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XmppUser")
            .field("jid", &self.jid)
            .field("bound", &self.session.borrow().bound)
            .field("priority", &self.priority)
            .field("backlog", &self.backlog.len())
            .finish_non_exhaustive()
    }
}

impl XmppUser {
    /// Options for logging in to `server` (Prosody or ejabberd) as `user@DOMAIN`, from the
    /// caller's namespace.
    ///
    /// # Panics
    /// When `user` does not make a valid JID.
    #[must_use]
    pub fn builder(server: &dyn XmppServer, user: &str, password: &str) -> XmppUserBuilder {
        let jid = BareJid::new(&server.jid(user))
            .unwrap_or_else(|e| panic!("{:?} is not a valid JID: {e}", server.jid(user)));
        XmppUserBuilder {
            jid,
            password: password.to_owned(),
            resource: None,
            addr: server.c2s_addr(),
            ca_der: server.ca_cert_der().to_vec(),
            conference: server.conference_domain(),
            server_log: server.log_path().to_owned(),
            netns: None,
            priority: Some(1),
            login_timeout: XMPP_LOGIN_TIMEOUT,
            step_timeout: XMPP_STEP_TIMEOUT,
        }
    }

    /// Logs in with default options (see [`XmppUserBuilder::connect`]).
    ///
    /// # Panics
    /// When the login fails.
    #[must_use]
    pub fn connect(server: &dyn XmppServer, user: &str, password: &str) -> XmppUser {
        XmppUser::builder(server, user, password).connect()
    }

    /// The account's bare JID.
    #[must_use]
    pub fn jid(&self) -> &BareJid {
        &self.jid
    }

    /// The JID the server bound for the current session.
    ///
    /// # Panics
    /// Never after a successful login.
    #[must_use]
    pub fn full_jid(&self) -> FullJid {
        self.session
            .borrow()
            .bound
            .clone()
            .expect("a logged-in session has a bound JID")
    }

    /// How many times this session has logged in: 1 after the login, one more after each
    /// reconnection that did not resume the stream (a server restart, say).
    #[must_use]
    pub fn logins(&self) -> u32 {
        self.session.borrow().logins
    }

    /// Waits until [`XmppUser::logins`] reaches `n` (the session reconnects by itself, backing
    /// off from 1 s up to 30 s).
    ///
    /// # Panics
    /// When `timeout` passes first.
    pub fn wait_logins(&mut self, n: u32, timeout: Duration) {
        let mut session = self.session.clone();
        let done = self.block_on_timeout(timeout, session.wait_for(|s| s.logins >= n));
        assert!(
            matches!(done, Ok(Ok(_))),
            "{}: timed out after {timeout:?} waiting for login number {n} (logins so far: {}); \
             server log {}",
            self.jid,
            self.logins(),
            self.server_log.display()
        );
    }

    /// Sends available presence with this priority (a chat client: positive). The presence
    /// is sent again after a reconnection.
    pub fn set_presence(&mut self, priority: i8) {
        self.send(Presence::available().with_priority(priority).into());
        self.priority = Some(priority);
    }

    /// Sends unavailable presence: the session stays logged in but gets no presence or chat.
    pub fn set_unavailable(&mut self) {
        self.send(Presence::unavailable().into());
        self.priority = None;
    }

    /// The roster as the server has it now.
    ///
    /// # Panics
    /// When the server does not answer with a roster in time.
    pub fn roster(&mut self) -> Vec<RosterItem> {
        let reply = self.iq(None, IqRequest::Get(roster_query()));
        let Some(element) = reply else {
            panic!("{}: the roster reply carries no roster", self.jid);
        };
        match Roster::try_from(element) {
            Ok(roster) => roster.items,
            Err(e) => panic!("{}: the roster reply is not a roster: {e}", self.jid),
        }
    }

    /// The subscription state with `contact`, `None` when it is not on the roster.
    pub fn subscription(&mut self, contact: &BareJid) -> Option<Subscription> {
        self.roster()
            .into_iter()
            .find(|item| &item.jid == contact)
            .map(|item| item.subscription)
    }

    /// Makes `self` and `other` friends the way two people do in chat clients: `self` asks to
    /// see `other`'s presence; `other` accepts and asks back; `self` accepts. Returns once both
    /// rosters show subscription `both`. Does nothing if they already do.
    ///
    /// # Panics
    /// When either has no available presence (the server would hold the requests back), or a
    /// step times out.
    pub fn befriend(&mut self, other: &mut XmppUser) {
        for user in [&*self, &*other] {
            assert!(
                user.priority.is_some(),
                "{} has no available presence: subscription requests would not reach it",
                user.jid
            );
        }
        let (me, them) = (self.jid.clone(), other.jid.clone());
        if self.subscription(&them) == Some(Subscription::Both)
            && other.subscription(&me) == Some(Subscription::Both)
        {
            return;
        }
        self.send(Presence::subscribe().with_to(them.clone()).into());
        other.wait_subscription_request(&me);
        other.send(Presence::subscribed().with_to(me.clone()).into());
        other.send(Presence::subscribe().with_to(me.clone()).into());
        self.wait_subscription_request(&them);
        self.send(Presence::subscribed().with_to(them.clone()).into());
        self.settle_both(&them);
        other.settle_both(&me);
    }

    /// Waits until `contact` shows `both` on the roster, asking for its presence again once
    /// halfway through. Each side's `to` comes from the other's approval, which an ejabberd
    /// cluster can drop: a node that handles the approval before the request it answers has
    /// reached its copy of the roster ignores it, as RFC 6121 says of an approval nobody asked
    /// for. Asked again, the contact's server approves at once, as it must for a contact that
    /// already approved.
    fn settle_both(&mut self, contact: &BareJid) {
        let both = |s: Option<Subscription>| s == Some(Subscription::Both);
        let deadline = Instant::now() + self.step_timeout / 2;
        while Instant::now() < deadline {
            if both(self.subscription(contact)) {
                return;
            }
            std::thread::sleep(ROSTER_POLL);
        }
        eprintln!(
            "{}: {contact} is not `both` on the roster after {:?}; asking again",
            self.jid,
            self.step_timeout / 2
        );
        self.send(Presence::subscribe().with_to(contact.clone()).into());
        self.wait_subscription(contact, both, "both");
    }

    /// Removes `other` from `self`'s contacts, as "remove contact" in a chat client does (a
    /// roster remove, which makes the server cancel both subscriptions). Returns once `other`
    /// is off `self`'s roster and `other`'s roster no longer shows `both`.
    ///
    /// # Panics
    /// When the server refuses or a step times out.
    pub fn unfriend(&mut self, other: &mut XmppUser) {
        let them = other.jid.clone();
        let me = self.jid.clone();
        let item = RosterItem {
            jid: them.clone(),
            name: None,
            subscription: Subscription::Remove,
            ask: Ask::None,
            groups: Vec::new(),
            approved: None,
        };
        let remove = Roster {
            ver: None,
            items: vec![item],
        };
        self.iq(None, IqRequest::Set(remove.into()));
        self.wait_subscription(&them, |s| s.is_none(), "no roster item");
        other.wait_subscription(
            &me,
            |s| matches!(s, None | Some(Subscription::None)),
            "subscription none",
        );
    }

    /// Sends a chat message to a bare JID (the server picks the resource).
    pub fn send_chat(&mut self, to: &BareJid, text: &str) {
        let message =
            Message::chat(Some(Jid::from(to.clone()))).with_body(Lang::default(), text.to_owned());
        self.send(message.into());
    }

    /// The next chat (or normal) message with a body, with its sender; `None` when none
    /// arrives within `timeout`.
    pub fn recv_chat(&mut self, timeout: Duration) -> Option<(Jid, String)> {
        self.wait_for(timeout, |stanza| match stanza {
            Stanza::Message(message)
                if matches!(message.type_, MessageType::Chat | MessageType::Normal) =>
            {
                let (_, body) = message.get_best_body(Vec::new())?;
                Some((message.from.clone()?, body.clone()))
            }
            _ => None,
        })
    }

    /// The next stanza that `pick` selects (received earlier and not yet taken, or arriving
    /// within `timeout`), for tests that look at raw stanzas.
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&Stanza) -> Option<T>,
    ) -> Option<T> {
        if let Some((i, value)) = self
            .backlog
            .iter()
            .enumerate()
            .find_map(|(i, stanza)| pick(stanza).map(|value| (i, value)))
        {
            self.backlog.remove(i);
            return Some(value);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let rt = self.rt.as_ref()?;
            let stanza = match rt
                .block_on(async { tokio::time::timeout(left, self.stanzas.recv()).await })
            {
                Ok(Some(stanza)) => stanza,
                Ok(None) | Err(_) => return None,
            };
            if let Some(value) = pick(&stanza) {
                return Some(value);
            }
            self.backlog.push_back(stanza);
        }
    }

    /// The MUC room `room@conference.DOMAIN`.
    ///
    /// # Panics
    /// When `room` does not make a valid JID.
    #[must_use]
    pub fn room_jid(&self, room: &str) -> BareJid {
        let jid = format!("{room}@{}", self.conference);
        BareJid::new(&jid).unwrap_or_else(|e| panic!("{jid:?} is not a valid room JID: {e}"))
    }

    /// Creates `room` as its owner and configures it the way ipop groups are: members-only,
    /// non-anonymous (members see real JIDs) and persistent. Stays joined.
    ///
    /// # Panics
    /// When the room exists already or the server refuses.
    pub fn create_room_members_only(&mut self, room: &str) -> BareJid {
        let room_jid = self.room_jid(room);
        let statuses = match self.enter_room(&room_jid) {
            Ok((statuses, _)) => statuses,
            Err(e) => panic!("{} cannot create room {room_jid}: {e}", self.jid),
        };
        assert!(
            statuses.contains(&Status::RoomHasBeenCreated),
            "{}: room {room_jid} existed already (statuses {statuses:?})",
            self.jid
        );
        let form = Element::builder("x", DATA_FORMS)
            .attr(name("type"), "submit")
            .append(form_field("FORM_TYPE", ROOM_CONFIG))
            .append(form_field("muc#roomconfig_membersonly", "1"))
            .append(form_field("muc#roomconfig_whois", "anyone"))
            .append(form_field("muc#roomconfig_persistentroom", "1"))
            .build();
        let query = Element::builder("query", MUC_OWNER).append(form).build();
        self.iq(Some(room_jid.clone().into()), IqRequest::Set(query));
        room_jid
    }

    /// Joins `room` (as nickname = the JID's local part); returns the occupants listed on
    /// joining, this session included, or the error condition of a refusal (for example
    /// `registration-required` when a members-only room does not list this user).
    ///
    /// # Panics
    /// When the server answers neither way in time.
    pub fn join(&mut self, room: &str) -> Result<Vec<Occupant>, String> {
        let room_jid = self.room_jid(room);
        self.enter_room(&room_jid).map(|(_, occupants)| occupants)
    }

    /// Leaves `room`.
    pub fn leave(&mut self, room: &str) {
        let to = self.occupant_jid(&self.room_jid(room));
        self.send(Presence::unavailable().with_to(to).into());
    }

    /// Makes `jid` a member of `room` (this user must own it).
    ///
    /// # Panics
    /// When the server refuses.
    pub fn add_member(&mut self, room: &str, jid: &BareJid) {
        self.set_affiliation(room, jid, "member");
    }

    /// Takes `jid`'s membership of `room` away; in a members-only room, the server also
    /// removes its sessions from the room.
    ///
    /// # Panics
    /// When the server refuses.
    pub fn remove_member(&mut self, room: &str, jid: &BareJid) {
        self.set_affiliation(room, jid, "none");
    }

    /// The members of `room` (affiliation `member`; owners are not listed).
    ///
    /// # Panics
    /// When the server refuses or answers something else than a list.
    pub fn members(&mut self, room: &str) -> Vec<BareJid> {
        let room_jid = self.room_jid(room);
        let item = Element::builder("item", MUC_ADMIN)
            .attr(name("affiliation"), "member")
            .build();
        let query = Element::builder("query", MUC_ADMIN).append(item).build();
        let Some(reply) = self.iq(Some(room_jid.into()), IqRequest::Get(query)) else {
            return Vec::new();
        };
        reply
            .children()
            .filter(|child| child.is("item", MUC_ADMIN))
            .filter_map(|child| child.attr("jid"))
            .map(|jid| {
                BareJid::new(jid).unwrap_or_else(|e| panic!("member {jid:?} is not a JID: {e}"))
            })
            .collect()
    }

    /// Sends a stanza and returns once the server has handled it (a presence is in effect, for
    /// example, before another user's stanza can meet it): the server handles a session's
    /// stanzas in order, so its answer to a ping sent next means it got that far.
    ///
    /// # Panics
    /// When it cannot be sent, or the ping is not answered, within the step timeout.
    pub fn send(&mut self, stanza: Stanza) {
        if let Err(e) = self.try_send(stanza) {
            panic!("{e}");
        }
    }

    /// Sends an IQ and returns the payload of its result.
    ///
    /// # Panics
    /// When the reply is an error or does not come within the step timeout.
    pub fn iq(&mut self, to: Option<Jid>, request: IqRequest) -> Option<Element> {
        let what = format!("{request:?} to {to:?}");
        match self.try_iq(to, request) {
            Ok(Ok(payload)) => payload,
            Ok(Err(e)) => panic!("{}: IQ {what} failed: {e}", self.jid),
            Err(e) => panic!("{e}"),
        }
    }

    fn try_send(&mut self, stanza: Stanza) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Send(Box::new(stanza), tx))?;
        let sent = self.block_on_timeout(self.step_timeout, async {
            written(rx.await.map_err(|_| SESSION_ENDED.to_owned())?).await
        });
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("{}: {e}", self.jid)),
            Err(_) => {
                return Err(format!(
                    "{}: a stanza was not sent within {:?} (disconnected?)",
                    self.jid, self.step_timeout
                ));
            }
        }
        let server = Jid::from(self.jid.domain().to_owned());
        self.try_iq(Some(server), IqRequest::Get(Ping.into()))?
            .map(drop)
            .map_err(|e| format!("{}: the server refused a ping: {e}", self.jid))
    }

    /// Sends an IQ. `Err` when the request could not be made or answered in time; `Ok(Err)` for
    /// an error reply, with its condition.
    pub fn try_iq(
        &mut self,
        to: Option<Jid>,
        request: IqRequest,
    ) -> Result<Result<Option<Element>, String>, String> {
        let (tx, rx) = oneshot::channel();
        self.command(Command::Iq(to, request, tx))?;
        let timeout = self.step_timeout;
        let reply = self.block_on_timeout(timeout, async {
            let (token, response) = rx.await.map_err(|_| SESSION_ENDED.to_owned())?;
            written(token).await?;
            response.await.map_err(|_| SESSION_ENDED.to_owned())
        });
        match reply {
            Ok(Ok(IqResponse::Result(payload))) => Ok(Ok(payload)),
            Ok(Ok(IqResponse::Error(error))) => Ok(Err(error_text(&Element::from(error)))),
            Ok(Err(e)) => Err(format!("{}: IQ failed: {e}", self.jid)),
            Err(_) => Err(format!(
                "{}: no IQ reply within {timeout:?}; server log {}",
                self.jid,
                self.server_log.display()
            )),
        }
    }

    fn command(&self, command: Command) -> Result<(), String> {
        self.cmds
            .send(command)
            .map_err(|_| format!("{}: {SESSION_ENDED}", self.jid))
    }

    /// Runs `future` on the user's runtime for at most `timeout`.
    fn block_on_timeout<F: Future>(
        &self,
        timeout: Duration,
        future: F,
    ) -> Result<F::Output, Elapsed> {
        self.rt
            .as_ref()
            .expect("the runtime lives until the user is dropped")
            .block_on(async { tokio::time::timeout(timeout, future).await })
    }

    fn wait_subscription_request(&mut self, from: &BareJid) {
        let timeout = self.step_timeout;
        let got = self.wait_for(timeout, |stanza| match stanza {
            Stanza::Presence(p)
                if p.type_ == PresenceType::Subscribe
                    && p.from.as_ref().map(Jid::to_bare).as_ref() == Some(from) =>
            {
                Some(())
            }
            _ => None,
        });
        assert!(
            got.is_some(),
            "{}: no subscription request from {from} within {timeout:?}",
            self.jid
        );
    }

    fn wait_subscription(
        &mut self,
        contact: &BareJid,
        done: impl Fn(Option<Subscription>) -> bool,
        what: &str,
    ) {
        let deadline = Instant::now() + self.step_timeout;
        loop {
            let state = self.subscription(contact);
            if done(state.clone()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out after {:?} waiting for {what} with {contact} on the roster; \
                 last seen: {state:?}",
                self.jid,
                self.step_timeout
            );
            std::thread::sleep(ROSTER_POLL);
        }
    }

    fn occupant_jid(&self, room: &BareJid) -> FullJid {
        let nick = self.jid.node().map_or("user", |node| node.as_str());
        room.with_resource_str(nick)
            .unwrap_or_else(|e| panic!("{nick:?} is not a valid nickname: {e}"))
    }

    /// Sends the join presence and collects occupants until our own presence (status 110);
    /// returns its statuses and the occupants, or the error condition.
    fn enter_room(&mut self, room: &BareJid) -> Result<(Vec<Status>, Vec<Occupant>), String> {
        let me = self.occupant_jid(room);
        let join = Presence::available()
            .with_to(me.clone())
            .with_payloads(vec![Muc::new().into()]);
        self.send(join.into());
        let mut occupants = Vec::new();
        let timeout = self.step_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let presence = self.wait_for(left, |stanza| match stanza {
                Stanza::Presence(p)
                    if p.from.as_ref().is_some_and(|from| from.to_bare() == *room) =>
                {
                    Some(p.clone())
                }
                _ => None,
            });
            let Some(presence) = presence else {
                panic!(
                    "{}: no answer from room {room} within {timeout:?}; server log {}",
                    self.jid,
                    self.server_log.display()
                );
            };
            if presence.type_ == PresenceType::Error {
                let error = presence
                    .payloads
                    .iter()
                    .find(|el| el.is("error", ns::JABBER_CLIENT))
                    .map_or_else(|| "an error without details".to_owned(), error_text);
                return Err(error);
            }
            let Some(user) = presence
                .payloads
                .iter()
                .find(|el| el.is("x", ns::MUC_USER))
                .and_then(|el| MucUser::try_from(el.clone()).ok())
            else {
                continue;
            };
            if presence.type_ == PresenceType::Unavailable {
                continue;
            }
            let nick = presence
                .from
                .as_ref()
                .and_then(Jid::resource)
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            occupants.push(Occupant {
                nick,
                jid: user.items.first().and_then(|item| item.jid.clone()),
            });
            if user.status.contains(&Status::SelfPresence) {
                return Ok((user.status, occupants));
            }
        }
    }

    fn set_affiliation(&mut self, room: &str, jid: &BareJid, affiliation: &str) {
        let room_jid = self.room_jid(room);
        let item = Element::builder("item", MUC_ADMIN)
            .attr(name("affiliation"), affiliation)
            .attr(name("jid"), jid.as_str())
            .build();
        let query = Element::builder("query", MUC_ADMIN).append(item).build();
        self.iq(Some(room_jid.into()), IqRequest::Set(query));
    }
}

impl Drop for XmppUser {
    fn drop(&mut self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Command::Close(tx)).is_ok() {
            // A stream that does not close in time is cut when the runtime shuts down.
            let _ = self.block_on_timeout(CLOSE_TIMEOUT, rx);
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_millis(500));
        }
    }
}

const SESSION_ENDED: &str = "the XMPP session has ended";

/// Waits until the stanza behind `token` is written to the stream.
async fn written(mut token: StanzaToken) -> Result<(), String> {
    match token.wait_for(StanzaStage::Sent).await {
        Some(StanzaState::Sent { .. } | StanzaState::Acked { .. }) => Ok(()),
        Some(StanzaState::Failed { error }) => Err(format!("cannot send a stanza: {error}")),
        Some(StanzaState::Queued | StanzaState::Dropped) | None => {
            Err("the stanza was dropped before it was sent".to_owned())
        }
    }
}

/// An IQ request waiting for its response.
struct PendingIq {
    /// Whom it was sent to; `None` for the account (the server answers).
    to: Option<Jid>,
    reply: oneshot::Sender<IqResponse>,
}

/// The driver task: the only owner of the stanza stream, so that sending and receiving never
/// wait for each other.
struct Driver {
    stream: StanzaStream,
    account: BareJid,
    stanzas: mpsc::UnboundedSender<Stanza>,
    session: watch::Sender<Session>,
    /// The last broadcast presence, re-sent after a reconnection.
    presence: Option<Presence>,
    /// IQ requests waiting for their response, by id.
    iqs: HashMap<String, PendingIq>,
    /// Stanza ids given so far.
    ids: u64,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let closed = loop {
            tokio::select! {
                event = self.stream.next() => match event {
                    Some(event) => self.on_event(event).await,
                    None => return,
                },
                command = commands.recv() => match command {
                    Some(Command::Send(stanza, reply)) => self.on_send(*stanza, reply).await,
                    Some(Command::Iq(to, request, reply)) => {
                        self.on_iq(to, request, reply).await;
                    }
                    Some(Command::Close(done)) => break Some(done),
                    None => break None,
                },
            }
        };
        // Sends what is queued, then the stream footer.
        self.stream.close().await;
        if let Some(done) = closed {
            // The user may have stopped waiting.
            let _ = done.send(());
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Stream(StreamEvent::Reset { bound_jid, .. }) => {
                let relogin = self.session.borrow().logins > 0;
                self.session.send_modify(|s| {
                    s.logins += 1;
                    s.bound = bound_jid.try_into_full().ok();
                });
                if relogin {
                    // What a chat client does on a new session: fetch the roster (which makes
                    // it an interested resource), then send its presence. The roster reply is
                    // not needed: it is queued like any unexpected stanza.
                    self.send(Stanza::Iq(Iq::Get {
                        from: None,
                        to: None,
                        id: String::new(),
                        payload: roster_query(),
                    }))
                    .await;
                    if let Some(presence) = self.presence.clone() {
                        self.send(presence.into()).await;
                    }
                }
            }
            // The stream goes on where it was: nothing to do.
            Event::Stream(StreamEvent::Suspended | StreamEvent::Resumed) => {}
            Event::Stanza(stanza) => {
                if let Some(reply) = auto_reply(&stanza, &self.account) {
                    self.send(reply.into()).await;
                }
                if let Some(stanza) = self.take_response(stanza) {
                    // The receiver is gone only while the user is being dropped.
                    let _ = self.stanzas.send(stanza);
                }
            }
        }
    }

    async fn on_send(&mut self, stanza: Stanza, reply: oneshot::Sender<StanzaToken>) {
        if let Stanza::Presence(p) = &stanza
            && p.to.is_none()
        {
            self.presence = Some(p.clone());
        }
        let token = self.send(stanza).await;
        // The user may have stopped waiting.
        let _ = reply.send(token);
    }

    async fn on_iq(
        &mut self,
        to: Option<Jid>,
        request: IqRequest,
        reply: oneshot::Sender<(StanzaToken, IqReply)>,
    ) {
        // Forget requests whose user stopped waiting.
        self.iqs.retain(|_, iq| !iq.reply.is_closed());
        let id = self.next_id();
        let (response_tx, response_rx) = oneshot::channel();
        self.iqs.insert(
            id.clone(),
            PendingIq {
                to: to.clone(),
                reply: response_tx,
            },
        );
        let iq = match request {
            IqRequest::Get(payload) => Iq::Get {
                from: None,
                to,
                id,
                payload,
            },
            IqRequest::Set(payload) => Iq::Set {
                from: None,
                to,
                id,
                payload,
            },
        };
        let token = self.send(iq.into()).await;
        // The user may have stopped waiting.
        let _ = reply.send((token, response_rx));
    }

    fn next_id(&mut self) -> String {
        self.ids += 1;
        format!("ipop-lab-{}", self.ids)
    }

    /// Queues a stanza, giving it an id if it has none, as chat clients do.
    async fn send(&mut self, mut stanza: Stanza) -> StanzaToken {
        match &mut stanza {
            Stanza::Iq(iq) if iq.id().is_empty() => *iq.id_mut() = self.next_id(),
            Stanza::Message(message) if message.id.is_none() => {
                message.id = Some(Id(self.next_id()));
            }
            Stanza::Presence(presence) if presence.id.is_none() => {
                presence.id = Some(self.next_id());
            }
            _ => {}
        }
        self.stream.send(Box::new(stanza)).await
    }

    /// Hands the response to a pending IQ request to whoever waits for it; gives back any other
    /// stanza.
    fn take_response(&mut self, stanza: Stanza) -> Option<Stanza> {
        let (id, response) = match stanza {
            Stanza::Iq(Iq::Result {
                from, id, payload, ..
            }) if self.awaits(from.as_ref(), &id) => (id, IqResponse::Result(payload)),
            Stanza::Iq(Iq::Error {
                from, id, error, ..
            }) if self.awaits(from.as_ref(), &id) => (id, IqResponse::Error(error)),
            other => return Some(other),
        };
        if let Some(pending) = self.iqs.remove(&id) {
            // The user may have stopped waiting.
            let _ = pending.reply.send(response);
        }
        None
    }

    fn awaits(&self, from: Option<&Jid>, id: &str) -> bool {
        self.iqs
            .get(id)
            .is_some_and(|iq| answers(&self.account, iq.to.as_ref(), from))
    }
}

/// Whether a response `from` someone answers a request sent `to` someone: only the addressee
/// may answer, the account's bare JID standing for no address (as in tokio-xmpp).
fn answers(account: &BareJid, to: Option<&Jid>, from: Option<&Jid>) -> bool {
    let account = Jid::from(account.clone());
    to.unwrap_or(&account) == from.unwrap_or(&account)
}

/// The reply a client owes to an IQ request: an empty result to roster pushes from its own
/// account and to pings, `service-unavailable` to anything else. `None` for other stanzas.
fn auto_reply(stanza: &Stanza, account: &BareJid) -> Option<Iq> {
    let Stanza::Iq(iq) = stanza else {
        return None;
    };
    let (from, id, payload) = match iq {
        Iq::Get {
            from, id, payload, ..
        }
        | Iq::Set {
            from, id, payload, ..
        } => (from, id, payload),
        Iq::Result { .. } | Iq::Error { .. } => return None,
    };
    let from_account = from.as_ref().is_none_or(|from| from.to_bare() == *account);
    let answerable =
        (payload.is("query", ns::ROSTER) && from_account) || payload.is("ping", ns::PING);
    Some(if answerable {
        Iq::Result {
            from: None,
            to: from.clone(),
            id: id.clone(),
            payload: None,
        }
    } else {
        Iq::Error {
            from: None,
            to: from.clone(),
            id: id.clone(),
            error: StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "not handled by this test client",
            ),
            payload: None,
        }
    })
}

fn roster_query() -> Element {
    Roster {
        ver: None,
        items: Vec::new(),
    }
    .into()
}

/// An attribute name. Only called with literals that are valid names.
fn name(attr: &'static str) -> NcName {
    NcName::try_from(attr).expect("a valid XML attribute name")
}

fn form_field(var: &str, value: &str) -> Element {
    Element::builder("field", DATA_FORMS)
        .attr(name("var"), var)
        .append(Element::builder("value", DATA_FORMS).append(value).build())
        .build()
}

/// The defined condition of an `<error/>` element (`registration-required`), with its text if
/// any.
fn error_text(error: &Element) -> String {
    let condition = error
        .children()
        .find(|child| child.ns() == ns::XMPP_STANZAS && child.name() != "text")
        .map_or("undefined-condition", Element::name);
    match error
        .children()
        .find(|child| child.is("text", ns::XMPP_STANZAS))
    {
        Some(text) => format!("{condition} ({})", text.text()),
        None => condition.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jid(s: &str) -> BareJid {
        BareJid::new(s).expect("a valid JID")
    }

    #[test]
    fn roster_pushes_from_the_account_get_a_result() {
        let push = Iq::Set {
            from: None,
            to: None,
            id: "push1".to_owned(),
            payload: roster_query(),
        };
        let reply = auto_reply(&Stanza::Iq(push), &jid("a@example.org"));
        assert!(
            matches!(reply, Some(Iq::Result { ref id, .. }) if id == "push1"),
            "{reply:?}"
        );
    }

    #[test]
    fn roster_pushes_from_others_and_unknown_requests_are_refused() {
        let push = Iq::Set {
            from: Some(Jid::from(jid("mallory@example.org"))),
            to: None,
            id: "p".to_owned(),
            payload: roster_query(),
        };
        let reply = auto_reply(&Stanza::Iq(push), &jid("a@example.org"));
        assert!(matches!(reply, Some(Iq::Error { .. })), "{reply:?}");
        let message = Stanza::Message(Message::chat(None));
        assert!(auto_reply(&message, &jid("a@example.org")).is_none());
    }

    #[test]
    fn only_the_addressee_answers_an_iq() {
        let account = jid("a@example.org");
        let bare = Jid::from(account.clone());
        let room = Jid::from(jid("room@conference.example.org"));
        let other = Jid::from(jid("mallory@example.org"));
        assert!(answers(&account, None, None));
        assert!(answers(&account, None, Some(&bare)));
        assert!(!answers(&account, None, Some(&other)));
        assert!(answers(&account, Some(&room), Some(&room)));
        assert!(!answers(&account, Some(&room), None));
        assert!(!answers(&account, Some(&room), Some(&other)));
    }

    #[test]
    fn error_text_names_the_condition() {
        let error: Element = "<error xmlns='jabber:client' type='auth'>\
             <registration-required xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>members only</text></error>"
            .parse()
            .expect("valid XML");
        assert_eq!(error_text(&error), "registration-required (members only)");
    }
}

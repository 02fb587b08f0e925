//! Multi-user chat (XEP-0045) as a group overlay: joining, creating and configuring a room,
//! reading occupants with their real JIDs, and changing affiliations.

use crate::announce;
use ipop_core::PublicKey;
use ipop_core::osn::{Claim, RelayOffer};
use tokio_xmpp::jid::{BareJid, FullJid};
use tokio_xmpp::minidom::{Element, rxml::xml_ncname};
use tokio_xmpp::parsers::data_forms::{DataForm, DataFormType, Field, FieldType};
use tokio_xmpp::parsers::muc::muc::{History, Muc};
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::stanza_error::{DefinedCondition, StanzaError};

pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
pub const NS_MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const NS_ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";

/// Status code: any occupant may see real JIDs (XEP-0045 §15.6.2).
pub const STATUS_NON_ANONYMOUS: u16 = 100;
/// Status code: the room has become non-anonymous.
pub const STATUS_NOW_NON_ANONYMOUS: u16 = 172;
/// Status code: the presence is our own.
pub const STATUS_SELF: u16 = 110;
/// Status code: the join created the room.
pub const STATUS_CREATED: u16 = 201;

/// A user's long-lived standing in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affiliation {
    Owner,
    Admin,
    Member,
    None,
    Outcast,
}

impl Affiliation {
    /// Members, admins and owners are authorised in the group overlay.
    pub fn authorised(self) -> bool {
        matches!(
            self,
            Affiliation::Owner | Affiliation::Admin | Affiliation::Member
        )
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "owner" => Affiliation::Owner,
            "admin" => Affiliation::Admin,
            "member" => Affiliation::Member,
            "none" => Affiliation::None,
            "outcast" => Affiliation::Outcast,
            _ => return None,
        })
    }
}

/// What the `muc#user` payload of an occupant presence says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OccupantInfo {
    pub statuses: Vec<u16>,
    pub affiliation: Affiliation,
    /// The occupant's real JID, when the room shows it.
    pub jid: Option<FullJid>,
}

impl OccupantInfo {
    pub fn has(&self, status: u16) -> bool {
        self.statuses.contains(&status)
    }
}

/// Most status codes one presence may carry; more is hostile.
const MAX_STATUSES: usize = 16;

/// Reads the `muc#user` payload of an occupant presence. Unknown status codes are kept as
/// numbers (the typed parser would refuse the whole payload).
pub fn read_occupant(payloads: &[Element]) -> Result<OccupantInfo, &'static str> {
    let x = payloads
        .iter()
        .find(|p| p.is("x", ns::MUC_USER))
        .ok_or("no muc#user payload")?;
    let mut statuses = Vec::new();
    for status in x.children().filter(|c| c.is("status", ns::MUC_USER)) {
        if statuses.len() == MAX_STATUSES {
            return Err("too many status codes");
        }
        let code = status
            .attr("code")
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or("bad status code")?;
        statuses.push(code);
    }
    let item = x
        .get_child("item", ns::MUC_USER)
        .ok_or("no item in muc#user payload")?;
    let affiliation = item
        .attr("affiliation")
        .and_then(Affiliation::parse)
        .ok_or("bad affiliation")?;
    let jid = match item.attr("jid") {
        None => None,
        Some(j) => Some(FullJid::new(j).map_err(|_| "real JID is not a full JID")?),
    };
    Ok(OccupantInfo {
        statuses,
        affiliation,
        jid,
    })
}

/// The nickname of a device in a room: its full JID, unique per device by construction.
pub fn nick(user: &BareJid, device: &str) -> String {
    format!("{user}/{device}")
}

/// The payloads of a join presence: the MUC element (no history) and the ipop announcement
/// with the device's claim in the group and the prefixes it routes there.
pub fn join_payloads(
    key: &PublicKey,
    claim: Option<Claim>,
    relay: Option<&RelayOffer>,
    routes: &[ipnet::IpNet],
    exit_dns: Option<u16>,
) -> Vec<Element> {
    let mut payloads = vec![
        Muc::new()
            .with_history(History::new().with_maxstanzas(0))
            .into(),
    ];
    payloads.extend(announce::payloads(key, claim, relay, routes, exit_dns));
    payloads
}

/// The owner's configuration of a room ipop creates: members-only, non-anonymous (anyone may
/// see real JIDs), persistent and hidden.
pub fn owner_config() -> Element {
    let field = |var: &str, value: &str| Field::new(var, FieldType::TextSingle).with_value(value);
    let form = DataForm::new(
        DataFormType::Submit,
        NS_ROOMCONFIG,
        vec![
            field("muc#roomconfig_membersonly", "1"),
            field("muc#roomconfig_whois", "anyone"),
            field("muc#roomconfig_persistentroom", "1"),
            field("muc#roomconfig_publicroom", "0"),
        ],
    );
    Element::builder("query", NS_MUC_OWNER)
        .append(Element::from(form))
        .build()
}

/// A muc#admin request that sets the affiliation of `jid`.
pub fn set_affiliation(jid: &BareJid, affiliation: &str) -> Element {
    Element::builder("query", NS_MUC_ADMIN)
        .append(
            Element::builder("item", NS_MUC_ADMIN)
                .attr(xml_ncname!("affiliation").into(), affiliation)
                .attr(xml_ncname!("jid").into(), jid.as_str())
                .build(),
        )
        .build()
}

/// Why a room refused a join, in words for the user.
pub fn join_refusal(error: Option<&StanzaError>, me: &BareJid) -> String {
    let Some(error) = error else {
        return "the room answered with an error without a reason".to_owned();
    };
    let why = match error.defined_condition {
        DefinedCondition::RegistrationRequired => {
            format!("it is members-only and {me} is not a member (ask an owner to add you)")
        }
        DefinedCondition::Forbidden => format!("{me} is banned from it"),
        DefinedCondition::Conflict => {
            "the nickname of this device is in use: is ipop already running on this device?"
                .to_owned()
        }
        DefinedCondition::ItemNotFound => {
            "it does not exist or is locked until its owner configures it".to_owned()
        }
        DefinedCondition::NotAllowed => "the service does not allow creating rooms".to_owned(),
        DefinedCondition::NotAuthorized => "it is password-protected".to_owned(),
        DefinedCondition::ServiceUnavailable => {
            "it is full or the chat service is unavailable".to_owned()
        }
        ref other => format!("{other:?}"),
    };
    match error.texts.values().next() {
        Some(text) if !text.is_empty() => format!("{why} (the server says: {text})"),
        _ => why,
    }
}

/// Why we are no longer in a room, and whether joining again may work.
/// Whether an occupant's unavailable presence ends its membership: a ban (301), a kick (307),
/// an affiliation change (321), or the room becoming members-only without it (322).
pub fn revokes(info: &OccupantInfo) -> bool {
    [301, 307, 321, 322].iter().any(|code| info.has(*code))
}

pub fn exit_reason(info: &OccupantInfo) -> (&'static str, bool) {
    if info.has(301) {
        ("we were banned from the room", false)
    } else if info.has(321) {
        ("our membership was revoked", false)
    } else if info.has(322) {
        (
            "the room became members-only and we are not a member",
            false,
        )
    } else if info.has(307) {
        ("we were kicked from the room", true)
    } else if info.has(332) {
        ("the chat service is shutting down", true)
    } else {
        ("the room removed us", true)
    }
}

/// A short description of a stanza error for logs and errors.
pub fn describe(error: &StanzaError) -> String {
    let condition = Element::from(error.defined_condition.clone())
        .name()
        .to_owned();
    match error.texts.values().next() {
        Some(text) if !text.is_empty() => format!("{condition}: {text}"),
        _ => condition,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(xml: &str) -> Vec<Element> {
        vec![xml.parse().expect("test XML is well-formed")]
    }

    #[test]
    fn occupant_payload_with_real_jid_and_unknown_status_codes() {
        let info = read_occupant(&payload(
            "<x xmlns='http://jabber.org/protocol/muc#user'><status code='110'/>\
             <status code='100'/><status code='999'/><item affiliation='owner' role='moderator' \
             jid='alice@example.org/laptop'/></x>",
        ))
        .expect("parses");
        assert!(info.has(STATUS_SELF) && info.has(STATUS_NON_ANONYMOUS) && info.has(999));
        assert_eq!(info.affiliation, Affiliation::Owner);
        assert_eq!(
            info.jid.as_ref().map(|j| j.as_str()),
            Some("alice@example.org/laptop")
        );
    }

    #[test]
    fn bad_occupant_payloads_are_refused() {
        for xml in [
            "<x xmlns='urn:other'/>",
            "<x xmlns='http://jabber.org/protocol/muc#user'/>",
            "<x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='king' role='x'/></x>",
            "<x xmlns='http://jabber.org/protocol/muc#user'><status code='abc'/>\
             <item affiliation='member' role='participant'/></x>",
            "<x xmlns='http://jabber.org/protocol/muc#user'>\
             <item affiliation='member' role='participant' jid='bob@example.org'/></x>",
        ] {
            assert!(read_occupant(&payload(xml)).is_err(), "{xml}");
        }
        let many = format!(
            "<x xmlns='http://jabber.org/protocol/muc#user'>{}\
             <item affiliation='member' role='participant'/></x>",
            "<status code='100'/>".repeat(MAX_STATUSES + 1)
        );
        assert_eq!(read_occupant(&payload(&many)), Err("too many status codes"));
    }

    #[test]
    fn owner_config_makes_the_room_members_only_and_non_anonymous() {
        let config = String::from(&owner_config());
        assert!(config.contains("muc#roomconfig_membersonly"));
        assert!(config.contains("anyone"));
        assert!(config.contains("submit"));
    }
}

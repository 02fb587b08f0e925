//! Datagrams into the daemon's DNS responder, answered from a table like the daemon's (devices
//! and users of an overlay, one name with more addresses than a response holds).
//!
//! Besides never panicking: a datagram that is not a DNS query gets no response; a query gets a
//! response that decodes, carries its ID and fits the size the query allows (512 bytes, or the
//! EDNS payload size between 512 and 1232 bytes).
#![no_main]

use hickory_proto::op::{Message, MessageType};
use ipop::dns::{NameTable, respond};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

/// The responder reads datagrams into a buffer of this size.
const MAX_DATAGRAM: usize = 4096;

fn table() -> &'static NameTable {
    static TABLE: OnceLock<NameTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = NameTable::new("ipop");
        let laptop = IpAddr::V4(Ipv4Addr::new(10, 78, 0, 2));
        t.insert("laptop.bob.example.org.ipop", laptop);
        t.insert(
            "laptop.bob.example.org.ipop",
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
        );
        t.insert("bob.example.org.ipop", laptop);
        t.insert(
            "phone.bob.example.org.ipop",
            IpAddr::V4(Ipv4Addr::new(10, 78, 0, 3)),
        );
        let crowded = format!("{}.carol.example.org.ipop", "d".repeat(60));
        for i in 0..100u8 {
            t.insert(&crowded, IpAddr::V4(Ipv4Addr::new(10, 78, 1, i)));
            t.insert(
                &crowded,
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, u16::from(i))),
            );
        }
        t
    })
}

fuzz_target!(|datagram: &[u8]| {
    if datagram.len() > MAX_DATAGRAM {
        return;
    }
    let response = respond(datagram, table());
    let query = Message::from_vec(datagram)
        .ok()
        .filter(|q| q.metadata.message_type == MessageType::Query);
    let Some(query) = query else {
        assert_eq!(response, None, "only queries are answered");
        return;
    };
    let Some(response) = response else {
        // A response that cannot be encoded is dropped (and logged).
        return;
    };
    let limit = query
        .edns
        .as_ref()
        .map_or(512, |e| usize::from(e.max_payload().clamp(512, 1232)));
    assert!(
        response.len() <= limit,
        "a response of {} bytes to a query that allows {limit}",
        response.len()
    );
    let decoded = Message::from_vec(&response).expect("our response decodes");
    assert_eq!(decoded.metadata.id, query.metadata.id);
    assert_eq!(decoded.metadata.message_type, MessageType::Response);
});

//! One UDP socket carries STUN, TURN and WireGuard. This module tells them apart by their full
//! header, never by the first byte alone (a STUN Binding success starts 0x01 0x01, a WireGuard
//! handshake initiation 0x01 0x00).

/// The STUN magic cookie (RFC 5389), at bytes 4..8 of every STUN message.
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// What a datagram received on the shared socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramKind {
    Stun,
    ChannelData,
    WireGuard,
    Unknown,
}

/// WireGuard message lengths: initiation, response and cookie reply are fixed; data messages
/// are at least a header and an authentication tag.
const WG_INIT_LEN: usize = 148;
const WG_RESPONSE_LEN: usize = 92;
const WG_COOKIE_LEN: usize = 64;
const WG_DATA_MIN_LEN: usize = 32;

/// Classifies a datagram by its header.
pub fn classify(d: &[u8]) -> DatagramKind {
    if d.len() >= 20 && d[0] < 0x40 && d[4..8] == STUN_MAGIC_COOKIE {
        return DatagramKind::Stun;
    }
    if d.len() >= 4 && (0x40..=0x7F).contains(&d[0]) {
        return DatagramKind::ChannelData;
    }
    if d.len() >= 4 && d[1..4] == [0, 0, 0] {
        let ok = match d[0] {
            1 => d.len() == WG_INIT_LEN,
            2 => d.len() == WG_RESPONSE_LEN,
            3 => d.len() == WG_COOKIE_LEN,
            4 => d.len() >= WG_DATA_MIN_LEN,
            _ => false,
        };
        if ok {
            return DatagramKind::WireGuard;
        }
    }
    DatagramKind::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_binding_success_is_not_a_wireguard_initiation() {
        let mut stun = vec![0x01, 0x01, 0x00, 0x00];
        stun.extend_from_slice(&STUN_MAGIC_COOKIE);
        stun.extend_from_slice(&[0; 12]);
        assert_eq!(classify(&stun), DatagramKind::Stun);

        let mut init = vec![0x01, 0, 0, 0];
        init.resize(WG_INIT_LEN, 0);
        assert_eq!(classify(&init), DatagramKind::WireGuard);
    }

    #[test]
    fn channel_data_and_wireguard_data() {
        assert_eq!(
            classify(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]),
            DatagramKind::ChannelData
        );
        let mut data = vec![4, 0, 0, 0];
        data.resize(WG_DATA_MIN_LEN, 0);
        assert_eq!(classify(&data), DatagramKind::WireGuard);
    }

    #[test]
    fn wrong_lengths_and_garbage_are_unknown() {
        let mut short_init = vec![1, 0, 0, 0];
        short_init.resize(100, 0);
        assert_eq!(classify(&short_init), DatagramKind::Unknown);
        assert_eq!(classify(&[4, 0, 0, 0, 0]), DatagramKind::Unknown);
        assert_eq!(classify(&[]), DatagramKind::Unknown);
        assert_eq!(classify(&[0xff; 200]), DatagramKind::Unknown);
        assert_eq!(classify(&[5, 0, 0, 0, 0, 0, 0, 0]), DatagramKind::Unknown);
    }
}

//! Ethernet-level helpers: addresses written into a frame, and MACs kept in one atomic
//! word.

/// Writes the destination and source MAC of a frame.
#[inline]
pub(super) fn set_macs(pkt: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    pkt[0..6].copy_from_slice(&dst);
    pkt[6..12].copy_from_slice(&src);
}

/// A MAC as one word, for an atomic; never 0, which means "not known yet".
#[inline]
pub(super) fn mac_u64(mac: [u8; 6]) -> u64 {
    let mut b = [0u8; 8];
    b[..6].copy_from_slice(&mac);
    // Bit 63 marks "known", so an all-zero MAC is still distinguishable from unset.
    u64::from_le_bytes(b) | 1 << 63
}

/// The MAC [`mac_u64`] made a word of.
#[inline]
pub(super) fn u64_mac(v: u64) -> [u8; 6] {
    let b = v.to_le_bytes();
    [b[0], b[1], b[2], b[3], b[4], b[5]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_survives_its_word_and_zero_is_known() {
        for mac in [[0u8; 6], [0xff; 6], [0x0a, 0x58, 10, 244, 1, 2]] {
            let w = mac_u64(mac);
            assert_ne!(w, 0, "a known MAC is never the unset word");
            assert_eq!(u64_mac(w), mac);
        }
    }
}

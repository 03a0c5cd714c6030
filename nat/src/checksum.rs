//! Internet checksums: full computation for headers we build, incremental update (RFC 1624)
//! for headers we rewrite, so a payload is never summed again on the hot path.

/// One's-complement sum of `data` folded into 16 bits, added to `initial` (not inverted).
pub fn sum(data: &[u8], initial: u32) -> u32 {
    let mut acc = initial as u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u64) << 8;
    }
    fold(acc)
}

/// Folds a wide one's-complement accumulator into 16 bits.
pub fn fold(mut acc: u64) -> u32 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u32
}

/// The checksum field value for `data` (the field itself must be zero inside `data`).
pub fn checksum(data: &[u8]) -> u16 {
    !(sum(data, 0) as u16)
}

/// RFC 1624 eqn. 3: the new checksum after a 16-bit word of the covered data changed from
/// `old` to `new`.
#[inline]
pub fn update16(check: u16, old: u16, new: u16) -> u16 {
    let acc = (!check) as u32 + (!old) as u32 + new as u32;
    !(fold(acc as u64) as u16)
}

/// [`update16`] for a run of bytes (an address): `old` and `new` have the same even length.
#[inline]
pub fn update_bytes(check: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    let mut acc = (!check) as u64;
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += (!u16::from_be_bytes([o[0], o[1]])) as u64;
        acc += u16::from_be_bytes([n[0], n[1]]) as u64;
    }
    !(fold(acc) as u16)
}

/// The pseudo-header sum for IPv4 transport checksums.
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let mut acc = sum(&src, 0) as u64 + sum(&dst, 0) as u64;
    acc += proto as u64 + len as u64;
    fold(acc)
}

/// The pseudo-header sum for IPv6 transport checksums.
pub fn pseudo_v6(src: [u8; 16], dst: [u8; 16], proto: u8, len: u32) -> u32 {
    let mut acc = sum(&src, 0) as u64 + sum(&dst, 0) as u64;
    acc += proto as u64 + (len >> 16) as u64 + (len & 0xffff) as u64;
    fold(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example: sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data, 0), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_equals_full() {
        let mut data = vec![0u8; 40];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let check = checksum(&data);
        let old: [u8; 4] = data[12..16].try_into().unwrap();
        let new = [172, 30, 0, 41];
        data[12..16].copy_from_slice(&new);
        assert_eq!(update_bytes(check, &old, &new), checksum(&data));
        let old16 = u16::from_be_bytes([data[20], data[21]]);
        data[20..22].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(
            update16(update_bytes(check, &old, &new), old16, 8080),
            checksum(&data)
        );
    }
}

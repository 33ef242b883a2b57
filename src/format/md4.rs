//! MD4 (RFC 1320). Only the NT password hash needs it (`agent::samba`), and nothing else in
//! the tools closure or the controller's chroot computes one.

/// The MD4 digest of `message`.
pub fn digest(message: &[u8]) -> [u8; 16] {
    let mut padded = message.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&((message.len() as u64).wrapping_mul(8)).to_le_bytes());

    let f = |x: u32, y: u32, z: u32| (x & y) | (!x & z);
    let g = |x: u32, y: u32, z: u32| (x & y) | (x & z) | (y & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let step = |a: u32, mix: u32, word: u32, constant: u32, shift: u32| {
        a.wrapping_add(mix).wrapping_add(word).wrapping_add(constant).rotate_left(shift)
    };

    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    for block in padded.chunks_exact(64) {
        let x: [u32; 16] = std::array::from_fn(|i| {
            u32::from_le_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]])
        });
        let [mut a, mut b, mut c, mut d] = state;
        for i in [0, 4, 8, 12] {
            a = step(a, f(b, c, d), x[i], 0, 3);
            d = step(d, f(a, b, c), x[i + 1], 0, 7);
            c = step(c, f(d, a, b), x[i + 2], 0, 11);
            b = step(b, f(c, d, a), x[i + 3], 0, 19);
        }
        for i in 0..4 {
            a = step(a, g(b, c, d), x[i], 0x5a82_7999, 3);
            d = step(d, g(a, b, c), x[i + 4], 0x5a82_7999, 5);
            c = step(c, g(d, a, b), x[i + 8], 0x5a82_7999, 9);
            b = step(b, g(c, d, a), x[i + 12], 0x5a82_7999, 13);
        }
        for i in [0, 2, 1, 3] {
            a = step(a, h(b, c, d), x[i], 0x6ed9_eba1, 3);
            d = step(d, h(a, b, c), x[i + 8], 0x6ed9_eba1, 9);
            c = step(c, h(d, a, b), x[i + 4], 0x6ed9_eba1, 11);
            b = step(b, h(c, d, a), x[i + 12], 0x6ed9_eba1, 15);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d]) {
            *s = s.wrapping_add(v);
        }
    }
    let mut digest = [0u8; 16];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    digest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn md4_matches_rfc_1320() {
        let vectors = [
            ("", "31d6cfe0d16ae931b73c59d7e0c089c0"),
            ("a", "bde52cb31de33e46245e05fbdbd6fb24"),
            ("abc", "a448017aaf21d8525fc10ae87aa6729d"),
            ("message digest", "d9130a8164549fe818874806e1c7014b"),
            ("abcdefghijklmnopqrstuvwxyz", "d79e1c308aa5bbcdeea8ed63df412da9"),
            ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789", "043f8582f241db351ce627e153e7f0e4"),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "e33b4ddc9c38f2199c3e7b164fcc0536",
            ),
        ];
        for (input, expected) in vectors {
            assert_eq!(hex(&digest(input.as_bytes())), expected, "MD4({input:?})");
        }
    }
}

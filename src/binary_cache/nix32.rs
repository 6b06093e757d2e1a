//! Nix's base-32 encoding of hashes ("nix32"): the form of the hash part of
//! every store path and of `NarHash`/`FileHash` in a narinfo.
//!
//! It is not RFC 4648 base32. The alphabet `0123456789abcdfghijklmnpqrsvwxyz`
//! leaves out `e`, `o`, `t` and `u`, and the bits run the other way: the
//! *last* character holds the five lowest bits of the first byte. This is
//! `printHash32`/`parseHash32` of Nix's `libutil/hash.cc`, which defines it.
//!
//! ```
//! use nixery::binary_cache::nix32;
//! // sha256("") as Nix prints it.
//! let hash = nix32::decode("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", 32).unwrap();
//! assert_eq!(hash[..4], [0xe3, 0xb0, 0xc4, 0x42]);
//! assert_eq!(nix32::encode(&hash), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
//! ```

/// The 32 characters, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not the nix32 form of a hash of the expected size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nix32Error {
    #[error("expected {expected} nix32 characters, found {found}")]
    Length { expected: usize, found: usize },
    #[error("{character:?} is not a nix32 character")]
    Character { character: char },
    #[error("the encoding has bits set beyond the hash's {bytes} bytes")]
    Overflow { bytes: usize },
}

/// The number of characters that encode `bytes` bytes: 32 for a store
/// path's 20-byte hash, 52 for a sha256.
pub const fn encoded_len(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes * 8 - 1) / 5 + 1
    }
}

/// Whether `c` is one of the 32 characters.
pub fn is_nix32_char(c: u8) -> bool {
    digit(c).is_some()
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|d| d as u8)
}

/// `hash` in nix32.
pub fn encode(hash: &[u8]) -> String {
    let len = encoded_len(hash.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = hash[i] >> j;
        let high = match hash.get(i + 1) {
            // `j` is at most 7, so the shift is at least 1.
            Some(next) if j > 0 => next << (8 - j),
            _ => 0,
        };
        out.push(ALPHABET[usize::from((low | high) & 0x1f)] as char);
    }
    out
}

/// The `bytes`-byte hash that `text` encodes. Refuses a wrong length, a
/// character outside the alphabet, and bits beyond the hash (so every hash
/// has exactly one encoding).
pub fn decode(text: &str, bytes: usize) -> Result<Vec<u8>, Nix32Error> {
    let expected = encoded_len(bytes);
    if text.len() != expected {
        return Err(Nix32Error::Length {
            expected,
            found: text.chars().count(),
        });
    }
    let mut hash = vec![0u8; bytes];
    for (n, c) in text.bytes().rev().enumerate() {
        let d = digit(c).ok_or_else(|| Nix32Error::Character {
            // A multi-byte character is reported by its first byte's
            // position; the text is refused either way.
            character: text[text.len() - 1 - n..]
                .chars()
                .next()
                .unwrap_or(char::REPLACEMENT_CHARACTER),
        })?;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        hash[i] |= d << j;
        // The bits of `d` that do not fit in byte `i` (only when j > 3: a
        // digit has five bits).
        let carry = if j > 3 { d >> (8 - j) } else { 0 };
        if i + 1 < bytes {
            hash[i + 1] |= carry;
        } else if carry != 0 {
            return Err(Nix32Error::Overflow { bytes });
        }
    }
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    /// Checked with Nix 2.8: `nix hash file --type sha256 --base32 f` of a
    /// file holding "hello", and of an empty one.
    #[test]
    fn known_sha256_values() {
        let cases = [
            (
                &b""[..],
                "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
            ),
            (
                &b"hello"[..],
                "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
            ),
        ];
        for (input, expected) in cases {
            let hash = Sha256::digest(input);
            assert_eq!(encode(&hash), expected);
            assert_eq!(decode(expected, 32).unwrap(), hash.to_vec());
        }
    }

    /// A 20-byte hash, the size of a store path's: `nix hash file --type
    /// sha1 --base32` of "hello".
    #[test]
    fn known_sha1_value() {
        let sha1 = hex::decode("aaf4c61ddcc5e8a2dabede0f3b482cd9aea9434d").unwrap();
        assert_eq!(encode(&sha1), "9m1skbnr5i43n3yypvda5s65vhfwdx5a");
        assert_eq!(
            decode("9m1skbnr5i43n3yypvda5s65vhfwdx5a", 20).unwrap(),
            sha1
        );
    }

    #[test]
    fn store_path_hashes_are_32_characters() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encode(&[0; 20]), "0".repeat(32));
        assert_eq!(encode(&[0xff; 20]), "z".repeat(32));
    }

    #[test]
    fn refuses_wrong_length_characters_and_overflow() {
        assert_eq!(
            decode("abc", 20),
            Err(Nix32Error::Length {
                expected: 32,
                found: 3
            })
        );
        // `e`, `o`, `t` and `u` are not in the alphabet.
        let mut text = "0".repeat(31);
        text.push('e');
        assert_eq!(
            decode(&text, 20),
            Err(Nix32Error::Character { character: 'e' })
        );
        // 52 characters hold 260 bits: the top four must be zero, so the
        // first character is 0 or 1.
        let mut text = "0".repeat(52);
        text.replace_range(0..1, "1");
        assert!(decode(&text, 32).is_ok());
        text.replace_range(0..1, "2");
        assert_eq!(decode(&text, 32), Err(Nix32Error::Overflow { bytes: 32 }));
        let mut text = "0".repeat(51);
        text.insert(0, 'z');
        assert!(decode(&text, 32).is_err());
    }

    proptest! {
        #[test]
        fn round_trip(hash in proptest::collection::vec(any::<u8>(), 0..64)) {
            let text = encode(&hash);
            prop_assert_eq!(text.len(), encoded_len(hash.len()));
            prop_assert!(text.bytes().all(is_nix32_char));
            prop_assert_eq!(decode(&text, hash.len()).unwrap(), hash);
        }

        #[test]
        fn decode_accepts_exactly_the_encodings(text in "[0-9a-z]{52}") {
            if let Ok(hash) = decode(&text, 32) {
                prop_assert_eq!(encode(&hash), text);
            }
        }
    }
}

//! JSON string escaping, the encoders' hottest loop: every byte of every line passes here.
//!
//! [`escape_json`] copies a message into the payload as the inside of a JSON string. On x86-64
//! with AVX2 it works 64 bytes at a time ([`avx2`]); elsewhere eight bytes at a time (SWAR).
//! Both give exactly what the byte-by-byte rule gives (a property test checks it).

/// Bytes that JSON strings can't hold as they are: 0 = copy, else the escape's second char
/// (`u` for `\u00XX`).
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t[0x08] = b'b';
    t[0x0c] = b'f';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Longest escape of one byte (`\u00XX`).
const MAX_ESCAPE: usize = 6;

/// The escape of byte `b` (one that [`ESCAPE`] flags) and its length.
#[inline]
fn escape_of(b: u8) -> ([u8; MAX_ESCAPE], usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match ESCAPE[b as usize] {
        b'u' => (
            [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 15) as usize],
            ],
            6,
        ),
        e => ([b'\\', e, 0, 0, 0, 0], 2),
    }
}

/// Appends `s` (valid UTF-8) to `out` escaped as the inside of a JSON string.
pub fn escape_json(s: &[u8], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above; the check is a cached load).
        unsafe { avx2::escape_json(s, out) };
        return;
    }
    escape_json_swar(s, out);
}

/// The bytes of `w` that need escaping (below 0x20, `"` or `\\`), flagged by their high bit;
/// word-at-a-time (SWAR): most of a log line needs nothing, and this skips it eight bytes per
/// step. The lowest flag is exact (a borrow only runs towards higher bytes, so it can flag a
/// byte above a real one, never below); only the lowest is used.
#[inline]
fn escape_mask(w: u64) -> u64 {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(LO) & !v & HI;
    let below_space = w.wrapping_sub(LO * 0x20) & !w & HI;
    below_space | has_zero(w ^ (LO * b'"' as u64)) | has_zero(w ^ (LO * b'\\' as u64))
}

/// [`escape_json`] without SIMD, for CPUs without AVX2.
///
/// Each step copies a whole word (a fixed-size copy, no call to `memcpy`); a word with a byte
/// to escape is cut back to just before that byte, the escape appended, and the next word read
/// from the byte after it.
pub fn escape_json_swar(s: &[u8], out: &mut Vec<u8>) {
    out.reserve(s.len() + 8);
    let mut i = 0;
    while let Some(chunk) = s.get(i..i + 8) {
        let word: [u8; 8] = chunk.try_into().expect("a slice of 8 bytes");
        let m = escape_mask(u64::from_le_bytes(word));
        let at = out.len();
        out.extend_from_slice(&word);
        if m == 0 {
            i += 8;
            continue;
        }
        let k = (m.trailing_zeros() / 8) as usize;
        out.truncate(at + k);
        let (e, n) = escape_of(word[k]);
        out.extend_from_slice(&e[..n]);
        i += k + 1;
    }
    for &b in &s[i..] {
        if ESCAPE[b as usize] == 0 {
            out.push(b);
        } else {
            let (e, n) = escape_of(b);
            out.extend_from_slice(&e[..n]);
        }
    }
}

/// The AVX2 escape: 64 bytes per step.
///
/// A step compares its block against the three classes at once, which gives a 64-bit mask
/// of the bytes to escape. A clean block is two 32-byte copies. Otherwise each flagged byte
/// costs one 64-byte copy of the run before it (only the run's length counts; the rest is
/// overwritten next) and its escape. There is no branch per byte and one per escape, where the
/// word loop took a branch per word that went either way (nginx lines hold a `"` every 30
/// bytes or so): 1.9 -> 3.5 GB/s on the bench's lines.
///
/// The copies read and write up to 64 bytes past what they keep, so: blocks run only while
/// that stays inside the input, the last one or two blocks are copied to a padded buffer
/// first, and `out` reserves room for the overshoot before each block.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8, _mm256_movemask_epi8,
        _mm256_or_si256, _mm256_set1_epi8, _mm256_storeu_si256,
    };

    use super::{escape_of, MAX_ESCAPE};

    const BLOCK: usize = 64;

    /// The bytes of the 32 at `p` that need escaping, one bit each.
    ///
    /// # Safety
    /// AVX2; `p..p + 32` readable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn flags32(p: *const u8) -> u64 {
        // SAFETY: the caller guarantees 32 readable bytes at `p`; the load is unaligned.
        let v = unsafe { _mm256_loadu_si256(p.cast::<__m256i>()) };
        // v <= 0x1f, unsigned: min(v, 0x1f) == v.
        let ctrl = _mm256_cmpeq_epi8(_mm256_min_epu8(v, _mm256_set1_epi8(0x1f)), v);
        let quote = _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'"' as i8));
        let back = _mm256_cmpeq_epi8(v, _mm256_set1_epi8(b'\\' as i8));
        _mm256_movemask_epi8(_mm256_or_si256(ctrl, _mm256_or_si256(quote, back))) as u32 as u64
    }

    /// Copies 64 bytes.
    ///
    /// # Safety
    /// AVX2; `src..src + 64` readable, `dst..dst + 64` writable.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn copy64(src: *const u8, dst: *mut u8) {
        // SAFETY: the caller guarantees both ranges; loads and stores are unaligned.
        unsafe {
            let a = _mm256_loadu_si256(src.cast::<__m256i>());
            let b = _mm256_loadu_si256(src.add(32).cast::<__m256i>());
            _mm256_storeu_si256(dst.cast::<__m256i>(), a);
            _mm256_storeu_si256(dst.add(32).cast::<__m256i>(), b);
        }
    }

    /// Escapes `blocks` blocks of [`BLOCK`] bytes from `src` onto `out`.
    ///
    /// # Safety
    /// AVX2; `src..src + BLOCK * (blocks + 1)` readable.
    #[target_feature(enable = "avx2")]
    unsafe fn escape_blocks(src: *const u8, blocks: usize, out: &mut Vec<u8>) {
        for k in 0..blocks {
            // SAFETY: block `k` and the block after it are readable (the caller's bound).
            let s = unsafe { src.add(BLOCK * k) };
            // SAFETY: as above; AVX2 is the caller's.
            let mut m = unsafe { flags32(s) | flags32(s.add(32)) << 32 };
            // Room for what the block can write: its bytes, its escapes' extra bytes, and a
            // copy's overshoot past the last kept byte.
            out.reserve(2 * BLOCK + (MAX_ESCAPE - 1) * m.count_ones() as usize);
            let dst = out.as_mut_ptr();
            let mut len = out.len();
            let mut from = 0;
            while m != 0 {
                let at = m.trailing_zeros() as usize;
                // SAFETY: `at < BLOCK`, inside this block.
                let (e, n) = escape_of(unsafe { *s.add(at) });
                // SAFETY: `from < BLOCK`, so the copy reads inside this block and the next;
                // `len` is at most the block's start plus `from` plus the extra bytes of the
                // escapes so far, so the copy (64 bytes) and the escape (6) end inside the
                // room reserved above.
                unsafe {
                    copy64(s.add(from), dst.add(len));
                    len += at - from;
                    std::ptr::copy_nonoverlapping(e.as_ptr(), dst.add(len), MAX_ESCAPE);
                }
                len += n;
                from = at + 1;
                m &= m - 1;
            }
            // SAFETY: as in the loop; every byte up to `len` is now written.
            unsafe {
                copy64(s.add(from), dst.add(len));
                out.set_len(len + BLOCK - from);
            }
        }
    }

    /// [`super::escape_json`] with AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn escape_json(s: &[u8], out: &mut Vec<u8>) {
        // Whole blocks whose copies (up to a block past their own) stay inside `s`.
        let whole = if s.len() >= 2 * BLOCK {
            (s.len() - BLOCK) / BLOCK
        } else {
            0
        };
        // SAFETY: BLOCK * (whole + 1) <= s.len(); AVX2 is the caller's.
        unsafe { escape_blocks(s.as_ptr(), whole, out) };
        // The rest, under two blocks, padded with a byte that needs no escape to whole blocks
        // plus one block of slack for the copies; the padding is cut off the output after.
        let rest = &s[whole * BLOCK..];
        let mut pad = [b'a'; 3 * BLOCK];
        pad[..rest.len()].copy_from_slice(rest);
        let blocks = rest.len().div_ceil(BLOCK);
        // SAFETY: blocks <= 2, and `pad` holds 3 blocks.
        unsafe { escape_blocks(pad.as_ptr(), blocks, out) };
        out.truncate(out.len() - (blocks * BLOCK - rest.len()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule, byte by byte (char by char).
    fn slow(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for c in s.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                '\u{8}' => out.extend_from_slice(b"\\b"),
                '\u{c}' => out.extend_from_slice(b"\\f"),
                c if (c as u32) < 0x20 => {
                    out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes())
                }
                c => out.extend_from_slice(c.to_string().as_bytes()),
            }
        }
        out
    }

    #[test]
    fn every_length_around_the_block_edges() {
        // Lengths across 0..4 blocks, an escape at each position in turn, appended after
        // existing output.
        for len in 0usize..260 {
            for at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut s: Vec<char> = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
                if let (Some(at), true) = (at, len > 0) {
                    s[at] = '\u{1}';
                }
                let s: String = s.into_iter().collect();
                let mut want = b"prefix".to_vec();
                want.extend_from_slice(&slow(&s));
                for f in [escape_json, escape_json_swar] {
                    let mut got = b"prefix".to_vec();
                    f(s.as_bytes(), &mut got);
                    assert_eq!(got, want, "len {len}, escape at {at:?}");
                }
            }
        }
    }

    proptest::proptest! {
        /// Both escapes equal the obvious byte-by-byte one, on short and long input, clean or
        /// dense with escapes.
        #[test]
        fn escape_matches_bytewise(s in ".{0,300}|[\"\\\\\\x00-\\x1fa-zé]{0,300}|[a-z\"]{100,700}") {
            let want = slow(&s);
            let mut fast = Vec::new();
            escape_json(s.as_bytes(), &mut fast);
            proptest::prop_assert_eq!(&fast, &want);
            let mut swar = Vec::new();
            escape_json_swar(s.as_bytes(), &mut swar);
            proptest::prop_assert_eq!(&swar, &want);
        }
    }
}

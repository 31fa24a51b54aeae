//! Line framing: cuts the bytes of one file into events (lines, or multiline events).
//!
//! A [`Framer`] is fed the bytes of its file in order, in chunks of any size, and calls back
//! with each complete event: its bytes (without the newline; a trailing `\r` is dropped too),
//! the offset of its first byte and the offset just past it (what can be acknowledged). Complete
//! lines are handed out as slices of the caller's buffer, without copying; only the incomplete
//! tail of a chunk is kept. A line longer than `max_line_bytes` is split (at a UTF-8 character
//! boundary where one is near) into events of at most that size, never dropped; the cut points
//! depend only on the bytes, not on how they were chunked, so re-reading after a restart gives
//! the same events. With a multiline start pattern, lines that do not match it join the event
//! before them. What stays incomplete is handed out by [`Framer::flush`] when the caller
//! decides it waited long enough.
//!
//! Pure: no IO, no clocks.

use std::sync::Arc;

/// An event as the framer hands it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    /// The event's bytes, without the final newline.
    pub bytes: &'a [u8],
    /// Offset of the first byte in the file.
    pub start: u64,
    /// Offset just past the event (including its newline, if any).
    pub end: u64,
    /// Whether this piece was cut from a longer line.
    pub split: bool,
}

/// Frames one file.
#[derive(Debug, Clone)]
pub struct Framer {
    max: usize,
    start_pattern: Option<Arc<regex::bytes::Regex>>,
    /// Offset of the next byte to be fed.
    next: u64,
    /// Incomplete line carried over between chunks; starts at `line_start`.
    line: Vec<u8>,
    line_start: u64,
    /// Multiline: the event being assembled (complete lines joined by `\n`).
    event: Vec<u8>,
    event_start: u64,
    event_end: u64,
    event_open: bool,
}

impl Framer {
    /// A framer for a file read from `offset`.
    pub fn new(
        offset: u64,
        max_line_bytes: usize,
        start_pattern: Option<Arc<regex::bytes::Regex>>,
    ) -> Framer {
        Framer {
            max: max_line_bytes.max(4),
            start_pattern,
            next: offset,
            line: Vec::new(),
            line_start: offset,
            event: Vec::new(),
            event_start: offset,
            event_end: offset,
            event_open: false,
        }
    }

    /// Offset of the next byte to feed.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Bytes fed but not yet handed out.
    pub fn pending(&self) -> usize {
        self.line.len() + self.event.len()
    }

    /// Offset just past the last event handed out: everything before it is framed.
    pub fn framed_offset(&self) -> u64 {
        if self.event_open {
            self.event_start
        } else {
            self.line_start
        }
    }

    /// Forgets everything and restarts at `offset` (the file was truncated).
    pub fn reset(&mut self, offset: u64) {
        *self = Framer::new(offset, self.max, self.start_pattern.take());
    }

    /// Feeds the next chunk of the file; calls `emit` for each complete event.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(Framed<'_>)) {
        while !data.is_empty() {
            // A line of exactly max_line_bytes is whole: look one byte further for its newline.
            let room = self.max - self.line.len();
            let scan = &data[..data.len().min(room + 1)];
            match memchr::memchr(b'\n', scan) {
                Some(i) => {
                    let end = self.next + i as u64 + 1;
                    if self.line.is_empty() {
                        self.line_done(&data[..i], self.next, end, false, emit);
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(&data[..i]);
                        self.line_done(&line, self.line_start, end, false, emit);
                        line.clear();
                        self.line = line;
                    }
                    self.next = end;
                    self.line_start = end;
                    data = &data[i + 1..];
                }
                None if data.len() > room => {
                    let scan = &data[..room];
                    // The line reaches max_line_bytes: cut a piece at a character boundary; the
                    // few bytes of a character cut in two start the next piece.
                    let mut piece = std::mem::take(&mut self.line);
                    piece.extend_from_slice(scan);
                    let cut = utf8_cut(&piece);
                    let end = self.line_start + cut as u64;
                    self.line_done(&piece[..cut], self.line_start, end, true, emit);
                    piece.drain(..cut);
                    self.line = piece;
                    self.next += scan.len() as u64;
                    self.line_start = end;
                    data = &data[scan.len()..];
                }
                None => {
                    self.line.extend_from_slice(data);
                    self.next += data.len() as u64;
                    data = &[];
                }
            }
        }
    }

    /// Hands out what is incomplete: the last line without its newline, and an open multiline
    /// event. Called when the file has been quiet for `flush_partial_after`, or is finished.
    pub fn flush(&mut self, emit: &mut impl FnMut(Framed<'_>)) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            let end = self.line_start + line.len() as u64;
            self.line_done(&line, self.line_start, end, false, emit);
            self.line_start = end;
        }
        self.close_event(emit);
    }

    /// A complete line (or a piece of one).
    fn line_done(
        &mut self,
        line: &[u8],
        start: u64,
        end: u64,
        split: bool,
        emit: &mut impl FnMut(Framed<'_>),
    ) {
        let line = match line.last() {
            Some(b'\r') if !split => &line[..line.len() - 1],
            _ => line,
        };
        let Some(re) = &self.start_pattern else {
            emit(Framed {
                bytes: line,
                start,
                end,
                split,
            });
            return;
        };
        let starts_event = !self.event_open || re.is_match(line);
        if starts_event {
            self.close_event(emit);
        }
        if self.event_open && self.event.len() + 1 + line.len() > self.max {
            // The event would exceed max_line_bytes: ship what it has, the line starts another.
            let mut ev = std::mem::take(&mut self.event);
            emit(Framed {
                bytes: &ev,
                start: self.event_start,
                end: self.event_end,
                split: true,
            });
            ev.clear();
            self.event = ev;
            self.event_open = false;
        }
        if self.event_open {
            self.event.push(b'\n');
        } else {
            self.event_open = true;
            self.event_start = start;
        }
        self.event.extend_from_slice(line);
        self.event_end = end;
    }

    fn close_event(&mut self, emit: &mut impl FnMut(Framed<'_>)) {
        if self.event_open {
            let mut ev = std::mem::take(&mut self.event);
            emit(Framed {
                bytes: &ev,
                start: self.event_start,
                end: self.event_end,
                split: false,
            });
            ev.clear();
            self.event = ev;
            self.event_open = false;
        }
    }
}

/// Where to cut `b` (`len >= 4`) so that the first part does not end inside a UTF-8
/// character; the full length when the tail is not UTF-8 at all.
fn utf8_cut(b: &[u8]) -> usize {
    let n = b.len();
    let Some(j) = (n.saturating_sub(4)..n)
        .rev()
        .find(|&j| b[j] & 0xc0 != 0x80)
    else {
        return n;
    };
    let need = match b[j] {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    };
    if j + need <= n || j == 0 {
        n
    } else {
        j
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(f: &mut Framer, chunks: &[&[u8]], flush: bool) -> Vec<(String, u64, u64, bool)> {
        let mut out = Vec::new();
        let mut emit = |e: Framed<'_>| {
            out.push((
                String::from_utf8_lossy(e.bytes).into_owned(),
                e.start,
                e.end,
                e.split,
            ))
        };
        for c in chunks {
            f.feed(c, &mut emit);
        }
        if flush {
            f.flush(&mut emit);
        }
        out
    }

    #[test]
    fn lines_offsets_and_partial_tail() {
        let mut f = Framer::new(100, 1024, None);
        let out = run(&mut f, &[b"ab\ncd", b"e\r\nf"], false);
        assert_eq!(
            out,
            vec![
                ("ab".into(), 100, 103, false),
                ("cde".into(), 103, 108, false)
            ]
        );
        assert_eq!(f.pending(), 1);
        assert_eq!(f.framed_offset(), 108);
        assert_eq!(f.next_offset(), 109);
        let out = run(&mut f, &[], true);
        assert_eq!(out, vec![("f".into(), 108, 109, false)]);
        assert_eq!(f.framed_offset(), 109);
    }

    #[test]
    fn long_line_is_split_not_dropped() {
        let mut f = Framer::new(0, 8, None);
        let out = run(&mut f, &[b"0123456789abcdefXYZ\nok\n"], false);
        assert_eq!(
            out,
            vec![
                ("01234567".into(), 0, 8, true),
                ("89abcdef".into(), 8, 16, true),
                ("XYZ".into(), 16, 20, false),
                ("ok".into(), 20, 23, false)
            ]
        );
    }

    #[test]
    fn split_respects_utf8() {
        let mut f = Framer::new(0, 8, None);
        let s = "aaaaaaé\n"; // 'é' is 2 bytes at 6..8; 8 bytes fit exactly.
        let out = run(&mut f, &[s.as_bytes()], false);
        assert_eq!(out, vec![("aaaaaaé".into(), 0, 9, false)]);
        let mut f = Framer::new(0, 8, None);
        let s = "aaaaaaaé\n"; // 'é' would straddle the cut.
        let out = run(&mut f, &[s.as_bytes()], false);
        assert_eq!(
            out,
            vec![("aaaaaaa".into(), 0, 7, true), ("é".into(), 7, 10, false)]
        );
    }

    #[test]
    fn multiline_joins_continuations() {
        let re = Arc::new(regex::bytes::Regex::new(r"^\d{4}-").expect("re"));
        let mut f = Framer::new(0, 1024, Some(re));
        let text = b"2024-01-01 boom\n  at a\n  at b\n2024-01-02 ok\n";
        let out = run(&mut f, &[text], false);
        assert_eq!(
            out,
            vec![("2024-01-01 boom\n  at a\n  at b".into(), 0, 30, false)]
        );
        assert_eq!(f.framed_offset(), 30);
        let out = run(&mut f, &[], true);
        assert_eq!(out, vec![("2024-01-02 ok".into(), 30, 44, false)]);
    }

    fn events(chunks: &[Vec<u8>], max: usize, multiline: bool) -> Vec<(Vec<u8>, u64, u64)> {
        let re = multiline.then(|| Arc::new(regex::bytes::Regex::new("^S").expect("re")));
        let mut f = Framer::new(0, max, re);
        let mut out = Vec::new();
        let mut emit = |e: Framed<'_>| out.push((e.bytes.to_vec(), e.start, e.end));
        for c in chunks {
            f.feed(c, &mut emit);
        }
        f.flush(&mut emit);
        out
    }

    proptest! {
        /// However the bytes are chunked, the events are the same, they tile the input, and
        /// none exceeds max_line_bytes.
        #[test]
        fn chunking_does_not_change_events(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'S'), Just(0xc3u8), Just(0xa9u8), Just(b'x')], 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..10),
            max in 4usize..40,
            multiline in any::<bool>(),
        ) {
            let whole = events(std::slice::from_ref(&data), max, multiline);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in cuts { chunks.push(data[prev..c].to_vec()); prev = c; }
            chunks.push(data[prev..].to_vec());
            let chunked = events(&chunks, max, multiline);
            prop_assert_eq!(&whole, &chunked);
            let mut at = 0;
            for (bytes, start, end) in &whole {
                prop_assert_eq!(*start, at);
                prop_assert!(bytes.len() <= max);
                at = *end;
            }
            prop_assert_eq!(at, data.len() as u64);
        }
    }
}

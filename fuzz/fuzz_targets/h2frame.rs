//! The HTTP/2 frame tracker on arbitrary bytes, fed in arbitrary chunks.
//!
//! Properties: it never panics; it accepts a prefix of what it is fed and
//! stays failed once failed; and how the stream is split into reads never
//! changes the outcome (the router sees TCP reads of any size).
#![no_main]

use balancer_common::h2frame::{DEFAULT_MAX_FRAME_SIZE, Tracker};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&split_seed, data)) = input.split_first() else {
        return;
    };
    let expect_preface = split_seed & 1 == 1;
    let mut whole = Tracker::new(expect_preface, DEFAULT_MAX_FRAME_SIZE);
    let accepted_whole = whole.feed(data);
    assert!(accepted_whole <= data.len());
    assert!(accepted_whole == data.len() || whole.failed().is_some());

    let mut chunked = Tracker::new(expect_preface, DEFAULT_MAX_FRAME_SIZE);
    let step = usize::from(split_seed >> 1).max(1);
    let mut accepted = 0;
    let mut failed_at = None;
    for chunk in data.chunks(step) {
        let n = chunked.feed(chunk);
        assert!(n <= chunk.len());
        if failed_at.is_some() {
            assert_eq!(n, 0, "nothing is accepted after a failure");
        }
        accepted += n;
        if chunked.failed().is_some() && failed_at.is_none() {
            failed_at = Some(accepted);
        }
    }
    assert_eq!(accepted, accepted_whole);
    assert_eq!(chunked.failed(), whole.failed());
    assert_eq!(chunked.last_stream, whole.last_stream);
    assert_eq!(chunked.streams_opened, whole.streams_opened);
    assert_eq!(chunked.frames, whole.frames);
});

//! The answer of `POST /api/v1/chunks/fetch`: for each requested tag, in request order, a frame
//! `[u32 LE length][length bytes]`, or the length word [`FETCH_ABSENT`] alone for a chunk the server does not
//! hold. The server writes it with [`frame_header`]; the client reads it with [`FetchFrames`], an I/O-free
//! parser fed with the body's pieces as they arrive, so that every chunk can be used as soon as its last
//! byte is in.

use crate::limits::{FETCH_ABSENT, MAX_CHUNK_BODY};
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;

/// The length word that starts a frame: the stored chunk's length, or [`FETCH_ABSENT`] for `None`.
pub fn frame_header(len: Option<usize>) -> [u8; 4] {
    match len {
        Some(n) => {
            assert!(n <= MAX_CHUNK_BODY, "a stored chunk is at most {MAX_CHUNK_BODY} bytes");
            (n as u32).to_le_bytes()
        }
        None => FETCH_ABSENT.to_le_bytes(),
    }
}

/// What is wrong with a `chunks/fetch` answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("chunks/fetch answer: frame {index} claims {len} bytes (a stored chunk is at most {max})", max = MAX_CHUNK_BODY)]
    TooLong { index: usize, len: u32 },
    #[error("chunks/fetch answer: bytes after the last of {expected} frames")]
    Trailing { expected: usize },
    #[error("chunks/fetch answer ended after {got} of {expected} frames")]
    Truncated { got: usize, expected: usize },
}

#[derive(Debug)]
enum State {
    /// Reading a length word; `have` of its 4 bytes are in `word`.
    Length { word: [u8; 4], have: usize },
    /// Reading a frame's bytes into its own buffer (so that the chunk handed out is not shared with the next).
    Body { buf: BytesMut, need: usize },
}

/// Incremental parser of a `chunks/fetch` answer for `expected` tags: [`push`](Self::push) the body's
/// pieces, [`pop`](Self::pop) each finished frame (`None` for an absent chunk), [`finish`](Self::finish)
/// at the end of the body. How the body was split never changes the frames.
#[derive(Debug)]
pub struct FetchFrames {
    expected: usize,
    /// Frames finished (handed out or waiting in `ready`).
    done: usize,
    state: State,
    ready: VecDeque<Option<Bytes>>,
}

impl FetchFrames {
    pub fn new(expected: usize) -> FetchFrames {
        FetchFrames {
            expected,
            done: 0,
            state: State::Length { word: [0; 4], have: 0 },
            ready: VecDeque::new(),
        }
    }

    /// Frames finished so far (including those not popped yet).
    pub fn frames_done(&self) -> usize {
        self.done
    }

    /// Take in the next piece of the body. An error poisons nothing the caller already popped.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.done == self.expected {
                return Err(FrameError::Trailing { expected: self.expected });
            }
            match &mut self.state {
                State::Length { word, have } => {
                    let n = (4 - *have).min(data.len());
                    word[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have == 4 {
                        let len = u32::from_le_bytes(*word);
                        if len == FETCH_ABSENT {
                            self.finish_frame(None);
                        } else if len as usize > MAX_CHUNK_BODY {
                            return Err(FrameError::TooLong { index: self.done, len });
                        } else {
                            let need = len as usize;
                            self.state = State::Body { buf: BytesMut::with_capacity(need), need };
                            if need == 0 {
                                self.finish_frame(Some(Bytes::new()));
                            }
                        }
                    }
                }
                State::Body { buf, need } => {
                    let n = (*need - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if buf.len() == *need {
                        let frame = std::mem::take(buf).freeze();
                        self.finish_frame(Some(frame));
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_frame(&mut self, frame: Option<Bytes>) {
        self.ready.push_back(frame);
        self.done += 1;
        self.state = State::Length { word: [0; 4], have: 0 };
    }

    /// The next finished frame, in request order: `Some(None)` for an absent chunk.
    pub fn pop(&mut self) -> Option<Option<Bytes>> {
        self.ready.pop_front()
    }

    /// The body ended: every frame must be complete.
    pub fn finish(&self) -> Result<(), FrameError> {
        let partial = !matches!(self.state, State::Length { have: 0, .. });
        if self.done < self.expected || partial {
            return Err(FrameError::Truncated { got: self.done, expected: self.expected });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn answer(frames: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&frame_header(f.as_ref().map(Vec::len)));
            if let Some(b) = f {
                v.extend_from_slice(b);
            }
        }
        v
    }

    /// The byte layout as docs/api.md gives it.
    #[test]
    fn golden_bytes() {
        let a = answer(&[Some(b"abc".to_vec()), None, Some(Vec::new())]);
        assert_eq!(a, [3, 0, 0, 0, b'a', b'b', b'c', 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }

    #[test]
    fn refuses_overlong_trailing_and_truncated_answers() {
        let mut p = FetchFrames::new(1);
        let too_long = (MAX_CHUNK_BODY as u32 + 1).to_le_bytes();
        assert_eq!(p.push(&too_long), Err(FrameError::TooLong { index: 0, len: MAX_CHUNK_BODY as u32 + 1 }));

        let mut p = FetchFrames::new(1);
        assert_eq!(p.push(&answer(&[None, None])), Err(FrameError::Trailing { expected: 1 }));

        for cut in 0..7 {
            let a = answer(&[Some(b"abc".to_vec())]);
            let mut p = FetchFrames::new(1);
            p.push(&a[..cut]).unwrap();
            assert_eq!(p.finish(), Err(FrameError::Truncated { got: 0, expected: 1 }), "cut at {cut}");
        }
        let mut p = FetchFrames::new(2);
        p.push(&answer(&[None])).unwrap();
        assert_eq!(p.finish(), Err(FrameError::Truncated { got: 1, expected: 2 }));
    }

    #[test]
    fn a_frame_is_its_own_allocation() {
        let mut p = FetchFrames::new(2);
        p.push(&answer(&[Some(vec![1; 1000]), Some(vec![2; 10])])).unwrap();
        let first = p.pop().unwrap().unwrap();
        // Unique, so a decoder may decrypt it in place.
        assert!(first.try_into_mut().is_ok());
    }

    proptest! {
        /// However the answer is split into pieces, the same frames come out, in order.
        #[test]
        fn any_split_gives_the_same_frames(
            frames in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)), 0..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let a = answer(&frames);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(a.len() + 1)).collect();
            at.push(0);
            at.push(a.len());
            at.sort_unstable();
            let mut p = FetchFrames::new(frames.len());
            let mut got = Vec::new();
            for w in at.windows(2) {
                p.push(&a[w[0]..w[1]]).unwrap();
                while let Some(f) = p.pop() {
                    got.push(f.map(|b| b.to_vec()));
                }
            }
            p.finish().unwrap();
            prop_assert_eq!(got, frames);
        }
    }
}

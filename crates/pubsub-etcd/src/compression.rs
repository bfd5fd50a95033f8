//! Compression of the records of a batch: the [`Compression`] policy a
//! producer or topic chooses, and the bounded compress/decompress of a
//! batch's encoded records (format version 2, see `proto/record.proto`).

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::pb;

/// The most bytes the records of one compressed batch may expand to. Part of
/// the format: producers write batches of at most 1.4 MiB of records, so
/// anything claiming more is garbage (or a decompression bomb) and is refused
/// before anything is allocated for it.
pub const MAX_DECODED_RECORDS_BYTES: usize = 2 * 1024 * 1024;

/// A compressed batch is stored plain unless compression saves at least
/// this share (1/20 = 5%) of its records' bytes, so incompressible payloads
/// cost only the attempt, and readers never decompress for nothing.
const MIN_SAVING_DIVISOR: usize = 20;

/// The zstd level used when none is given, zstd's own default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// How a producer compresses the records of each batch it appends.
///
/// Written and parsed as `none`, `lz4`, `zstd` or `zstd:LEVEL` (1 to 22).
/// The default is `none`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compression {
    /// Records are stored as encoded.
    #[default]
    None,
    /// LZ4 (block format): fast, modest ratio.
    Lz4,
    /// Zstandard at this level: slower, higher ratio.
    Zstd { level: i32 },
}

impl Compression {
    /// zstd at [`DEFAULT_ZSTD_LEVEL`].
    pub const fn zstd() -> Self {
        Compression::Zstd {
            level: DEFAULT_ZSTD_LEVEL,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        match self {
            Compression::Zstd { level } if !(1..=22).contains(level) => Err(Error::InvalidConfig(
                format!("zstd level {level} is out of range; it must be between 1 and 22"),
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Zstd { level } => write!(f, "zstd:{level}"),
        }
    }
}

impl FromStr for Compression {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let invalid = || {
            Error::InvalidConfig(format!(
                "compression {s:?} is not one of none, lz4, zstd, zstd:LEVEL"
            ))
        };
        let parsed = match s {
            "none" => Compression::None,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::zstd(),
            other => match other.strip_prefix("zstd:") {
                Some(level) => Compression::Zstd {
                    level: level.parse().map_err(|_| invalid())?,
                },
                None => return Err(invalid()),
            },
        };
        parsed.validate()?;
        Ok(parsed)
    }
}

impl Serialize for Compression {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How much of a batch is compressed first to judge whether the rest is
/// worth it: incompressible batches (random or already compressed payloads)
/// then cost the attempt on 16 KiB, not on the whole batch.
const SAMPLE_BYTES: usize = 16 * 1024;

thread_local! {
    /// One zstd compression context per thread and its level: making one
    /// allocates about a megabyte, which costs more than a small batch.
    static ZSTD_COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    /// One zstd decompression context per thread, for the same reason.
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compresses encoded records; `None` when the codec is `none` or saves
/// less than the threshold (the batch is then stored plain). A batch larger
/// than [`SAMPLE_BYTES`] is judged by its first [`SAMPLE_BYTES`] first.
pub(crate) fn compress(compression: Compression, records: &[u8]) -> Option<(pb::Codec, Bytes)> {
    if records.len() > SAMPLE_BYTES {
        compress_all(compression, &records[..SAMPLE_BYTES])?;
    }
    compress_all(compression, records)
}

fn compress_all(compression: Compression, records: &[u8]) -> Option<(pb::Codec, Bytes)> {
    let (codec, out) = match compression {
        Compression::None => return None,
        Compression::Lz4 => (pb::Codec::Lz4, lz4_flex::block::compress(records)),
        Compression::Zstd { level } => (pb::Codec::Zstd, zstd_compress(level, records)?),
    };
    let worth_it = out.len() <= records.len() - records.len() / MIN_SAVING_DIVISOR;
    worth_it.then(|| (codec, Bytes::from(out)))
}

fn zstd_compress(level: i32, records: &[u8]) -> Option<Vec<u8>> {
    ZSTD_COMPRESSOR.with_borrow_mut(|cached| {
        if cached.as_ref().is_none_or(|(l, _)| *l != level) {
            *cached = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, compressor) = cached.as_mut()?;
        compressor.compress(records).ok()
    })
}

fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    ZSTD_DECOMPRESSOR.with_borrow_mut(|cached| {
        if cached.is_none() {
            *cached = Some(zstd::bulk::Decompressor::new()?);
        }
        cached
            .as_mut()
            .expect("set above")
            .decompress(data, capacity)
    })
}

/// Expands the compressed records of the batch stored at `key`, allocating
/// at most `records_len` bytes, itself at most [`MAX_DECODED_RECORDS_BYTES`].
pub(crate) fn decompress(key: &[u8], codec: i32, data: &[u8], records_len: u32) -> Result<Vec<u8>> {
    let corrupt = |reason: String| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason,
    };
    let len = records_len as usize;
    if len > MAX_DECODED_RECORDS_BYTES {
        return Err(corrupt(format!(
            "compressed batch claims {len} bytes of records; at most {MAX_DECODED_RECORDS_BYTES} are allowed"
        )));
    }
    let out = match pb::Codec::try_from(codec) {
        Ok(pb::Codec::Lz4) => {
            let mut out = vec![0; len];
            let written = lz4_flex::block::decompress_into(data, &mut out)
                .map_err(|e| corrupt(format!("bad lz4 data: {e}")))?;
            out.truncate(written);
            out
        }
        Ok(pb::Codec::Zstd) => zstd_decompress(data, len)
            .map_err(|e| corrupt(format!("bad zstd data (or more than {len} bytes): {e}")))?,
        Ok(pb::Codec::None) => {
            return Err(corrupt(
                "format version 2 batch with codec none; version 2 is for compressed batches"
                    .into(),
            ))
        }
        Err(_) => return Err(corrupt(format!("unknown compression codec {codec}"))),
    };
    if out.len() != len {
        return Err(corrupt(format!(
            "compressed records expand to {} bytes, but the batch says {len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for (s, c) in [
            ("none", Compression::None),
            ("lz4", Compression::Lz4),
            ("zstd:3", Compression::zstd()),
            ("zstd:19", Compression::Zstd { level: 19 }),
        ] {
            assert_eq!(s.parse::<Compression>().unwrap(), c);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("zstd".parse::<Compression>().unwrap(), Compression::zstd());
        for bad in ["gzip", "zstd:0", "zstd:23", "zstd:x", ""] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
    }

    #[test]
    fn round_trips_and_skips_incompressible_data() {
        let text = b"level=info service=api msg=hello ".repeat(100);
        for c in [Compression::Lz4, Compression::zstd()] {
            let (codec, data) = compress(c, &text).unwrap();
            assert!(data.len() < text.len() / 5);
            let back = decompress(b"k", codec as i32, &data, text.len() as u32).unwrap();
            assert_eq!(back, text);
        }
        let random: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        assert!(compress(Compression::zstd(), &random).is_none());
        assert!(compress(Compression::Lz4, &random).is_none());
        assert!(compress(Compression::None, &text).is_none());
    }

    #[test]
    fn a_large_batch_is_judged_by_its_first_sample() {
        // Compressible as a whole, but its first 16 KiB are random: stored
        // plain without compressing the rest.
        let mut batch: Vec<u8> = (0..SAMPLE_BYTES).map(|_| rand::random::<u8>()).collect();
        batch.extend(std::iter::repeat_n(b'a', 20 * SAMPLE_BYTES));
        for c in [Compression::Lz4, Compression::zstd()] {
            assert!(compress(c, &batch).is_none(), "{c}");
            assert!(compress_all(c, &batch).is_some(), "{c}");
        }
        // A compressible sample lets the whole batch be compressed.
        let text = b"level=info service=api msg=hello ".repeat(2000);
        assert!(text.len() > SAMPLE_BYTES);
        for c in [
            Compression::Lz4,
            Compression::zstd(),
            Compression::Zstd { level: 9 },
        ] {
            let (codec, data) = compress(c, &text).unwrap();
            let back = decompress(b"k", codec as i32, &data, text.len() as u32).unwrap();
            assert_eq!(back, text, "{c}");
        }
    }

    #[test]
    fn bombs_garbage_and_unknown_codecs_are_refused() {
        // 64 MiB of zeros compress to a few KiB.
        let zeros = vec![0u8; 64 << 20];
        let bomb = zstd::bulk::compress(&zeros, 3).unwrap();
        let claim = MAX_DECODED_RECORDS_BYTES as u32;
        let err = decompress(b"k", pb::Codec::Zstd as i32, &bomb, claim).unwrap_err();
        assert!(err.to_string().contains("bad zstd data"), "{err}");
        let lz4_bomb = lz4_flex::block::compress(&zeros);
        let err = decompress(b"k", pb::Codec::Lz4 as i32, &lz4_bomb, claim).unwrap_err();
        assert!(err.to_string().contains("bad lz4 data"), "{err}");
        let err = decompress(b"k", pb::Codec::Zstd as i32, &bomb, u32::MAX).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        let err = decompress(b"key/x", 9, b"abc", 3).unwrap_err();
        assert!(
            err.to_string().contains("unknown compression codec 9")
                && err.to_string().contains("key/x"),
            "{err}"
        );
        for codec in [pb::Codec::Lz4, pb::Codec::Zstd] {
            let err = decompress(b"k", codec as i32, &[0xff; 40], 1000).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        }
    }
}

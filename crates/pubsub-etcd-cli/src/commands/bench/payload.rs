//! The message values benchmarks send (`--payload`): random bytes, prose,
//! or structured log lines, generated in code before the clock starts.
//!
//! Values are cut from (or cycle through) a pool of 16 MiB or more, larger
//! than any batch and any codec's window, so a batch never holds the same
//! value twice and compresses only as well as its kind of data does; the
//! pool is seeded, so runs are comparable.
//!
//! The pool lives for the rest of the process (it is leaked once per run),
//! so its values are `Bytes::from_static`: a clone or drop of one touches no
//! reference count. A shared count would be bumped by the sender's thread
//! and dropped by the producer's batching thread for every message, a cache
//! line bouncing between the cores that costs the producer measurable
//! throughput, which an application's freshly built values never pay.

use pubsub_etcd::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cli::Payload;

/// Bytes of random data or text values are cut from.
const POOL_BYTES: usize = 16 << 20;
/// Distinct log lines cycled through: about 13 MB, some 5,000 batches'
/// worth of lines before one repeats.
const LOG_LINES: usize = 32_768;
const SEED: u64 = 0x7075_6273_7562;

/// Hands out the values of one run, one per message. Clones share the
/// pool.
#[derive(Clone)]
pub struct Values {
    pool: Pool,
    next: usize,
}

#[derive(Clone)]
enum Pool {
    /// Values are `size`-byte windows of one buffer, at rolling offsets.
    Cut { data: Bytes, size: usize },
    /// Whole values, in turn.
    Lines(&'static [Bytes]),
}

impl Values {
    pub fn new(payload: Payload, size: u32) -> Self {
        let mut rng = StdRng::seed_from_u64(SEED);
        let size = size as usize;
        let pool = match payload {
            Payload::Random => {
                let mut data = vec![0u8; POOL_BYTES.max(size)];
                rng.fill(&mut data[..]);
                Pool::Cut {
                    data: leak(data),
                    size,
                }
            }
            Payload::Text => Pool::Cut {
                data: leak(prose(&mut rng, POOL_BYTES.max(size))),
                size,
            },
            Payload::JsonLogs => Pool::Lines(Vec::leak(
                (0..LOG_LINES)
                    .map(|i| leak(log_line(&mut rng, i)))
                    .collect(),
            )),
        };
        Values { pool, next: 0 }
    }

    /// A cursor over the same pool starting at the `part`-th of `parts`
    /// equal stretches, so that concurrent senders send different values.
    pub fn part(&self, part: u64, parts: u64) -> Values {
        let len = match &self.pool {
            Pool::Cut { data, .. } => data.len(),
            Pool::Lines(lines) => lines.len(),
        } as u64;
        Values {
            pool: self.pool.clone(),
            next: (len * part / parts.max(1)) as usize,
        }
    }

    /// The next value: cheap, a reference into the pool.
    pub fn next_value(&mut self) -> Bytes {
        match &self.pool {
            Pool::Cut { data, size } => {
                if self.next + size > data.len() {
                    self.next = 0;
                }
                let value = data.slice(self.next..self.next + size);
                // An odd step, so windows do not line up from one pass over
                // the pool to the next.
                self.next += size + 1;
                value
            }
            Pool::Lines(lines) => {
                let value = lines[self.next % lines.len()].clone();
                self.next += 1;
                value
            }
        }
    }
}

fn leak(data: Vec<u8>) -> Bytes {
    Bytes::from_static(Vec::leak(data))
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "she",
    "other",
    "its",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "said",
    "made",
    "found",
    "called",
    "became",
    "small",
    "large",
    "early",
    "long",
    "great",
    "little",
    "own",
    "old",
    "big",
    "high",
    "different",
    "local",
    "public",
    "able",
];

/// Sentences of random words, capitalised and punctuated.
fn prose(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut start = true;
    while out.len() < len {
        let word = WORDS[rng.random_range(0..WORDS.len())];
        if start {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase().to_string().bytes());
                out.extend(chars.as_str().bytes());
            }
            start = false;
        } else {
            out.extend(word.bytes());
        }
        match rng.random_range(0..12) {
            0 => {
                out.extend(b". ");
                start = true;
            }
            1 => out.extend(b", "),
            _ => out.push(b' '),
        }
    }
    out.truncate(len);
    out
}

const SERVICES: &[&str] = &[
    "checkout",
    "payments",
    "inventory",
    "search",
    "auth",
    "gateway",
    "shipping",
    "catalog",
];
const ROUTES: &[&str] = &[
    "/api/v1/orders",
    "/api/v1/cart/items",
    "/api/v1/users/me",
    "/api/v2/search",
    "/healthz",
    "/api/v1/payments/authorize",
    "/api/v1/products",
];
const MESSAGES: &[&str] = &[
    "request completed",
    "cache miss, loading from database",
    "retrying upstream call after timeout",
    "user session refreshed",
    "payment authorization declined by issuer",
    "slow query detected",
    "rate limit exceeded for client",
    "order state changed",
];

/// One structured log line of 200-600 bytes, as services emit them: the
/// i-th of a run, so timestamps increase.
fn log_line(rng: &mut StdRng, i: usize) -> Vec<u8> {
    let level = match rng.random_range(0..100) {
        0..=69 => "info",
        70..=84 => "debug",
        85..=96 => "warn",
        _ => "error",
    };
    let millis = 1_764_680_000_000u64 + i as u64 * 3 + rng.random_range(0..3);
    let (secs, ms) = (millis / 1000, millis % 1000);
    let service = SERVICES[rng.random_range(0..SERVICES.len())];
    let target = rng.random_range(200..=600usize);
    let mut line = format!(
        r#"{{"ts":"2025-12-02T{:02}:{:02}:{:02}.{ms:03}Z","level":"{level}","service":"{service}","trace_id":"{:032x}","msg":"{}""#,
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        rng.random::<u128>(),
        MESSAGES[rng.random_range(0..MESSAGES.len())],
    );
    // More fields while they fit in the drawn length, then a note to reach it.
    let fields = [
        format!(r#","host":"{service}-{:x}""#, rng.random_range(0..64u32)),
        format!(r#","span_id":"{:016x}""#, rng.random::<u64>()),
        format!(
            r#","http":{{"method":"{}","route":"{}","status":{},"duration_ms":{:.3}}}"#,
            ["GET", "POST", "PUT", "DELETE"][rng.random_range(0..4)],
            ROUTES[rng.random_range(0..ROUTES.len())],
            [200, 200, 200, 201, 204, 400, 404, 500][rng.random_range(0..8)],
            rng.random_range(0.1..900.0f64),
        ),
        format!(r#","user_id":{}"#, rng.random_range(1..2_000_000u32)),
        format!(
            r#","region":"{}""#,
            ["eu-west-1", "us-east-1", "ap-south-1"][rng.random_range(0..3)]
        ),
        r#","cache":"miss","attempt":1"#.to_string(),
        r#","feature_flags":["new-checkout","fast-search"]"#.to_string(),
        r#","client_version":"4.18.2","tenant":"acme-corp""#.to_string(),
        format!(
            r#","db_rows":{},"queue_depth":{}"#,
            rng.random_range(0..500),
            rng.random_range(0..64)
        ),
    ];
    // The note's name and quotes, and the closing brace.
    const NOTE: usize = r#","note":"""#.len() + 1;
    for field in &fields {
        // Always leave room for a note of at least one character.
        if line.len() + field.len() + NOTE + 1 > target {
            break;
        }
        line.push_str(field);
    }
    let text = prose(rng, target.saturating_sub(line.len() + NOTE).max(1));
    line.push_str(r#","note":""#);
    line.push_str(&String::from_utf8_lossy(&text));
    line.push('"');
    line.push('}');
    line.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_json_of_200_to_600_bytes() {
        let mut values = Values::new(Payload::JsonLogs, 0);
        for _ in 0..2000 {
            let v = values.next_value();
            assert!((200..=600).contains(&v.len()), "{} bytes", v.len());
            let parsed: serde_json::Value = serde_json::from_slice(&v).unwrap();
            for field in ["ts", "level", "service", "trace_id", "msg"] {
                assert!(parsed[field].is_string(), "{field} in {parsed}");
            }
        }
    }

    #[test]
    fn cut_values_have_the_size_and_differ() {
        for payload in [Payload::Random, Payload::Text] {
            let mut values = Values::new(payload, 300);
            let a = values.next_value();
            let b = values.next_value();
            assert_eq!((a.len(), b.len()), (300, 300));
            assert_ne!(a, b);
        }
    }
}

//! kcat-style format strings for `consume --format-string`: `%t %p %o %k
//! %s %T %h` and friends, parsed once and written per message as bytes.

use std::io::{self, Write};

use pubsub_etcd::Message;

/// One piece of a parsed format string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(Vec<u8>),
    Topic,
    Partition,
    Offset,
    Key,
    KeyLength,
    Value,
    ValueLength,
    Timestamp,
    Headers,
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// What each directive means, for `--help` and for errors.
const DIRECTIVES: &str = "%t topic, %p partition, %o offset, %k key, %K key length, \
    %s value, %S value length, %T timestamp (ms), %h headers (name=value,...), %% a percent sign; \
    \\n \\t \\r \\\\ escapes";

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut literal = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            let piece = match c {
                '%' => match chars.next() {
                    Some('t') => Piece::Topic,
                    Some('p') => Piece::Partition,
                    Some('o') => Piece::Offset,
                    Some('k') => Piece::Key,
                    Some('K') => Piece::KeyLength,
                    Some('s') => Piece::Value,
                    Some('S') => Piece::ValueLength,
                    Some('T') => Piece::Timestamp,
                    Some('h') => Piece::Headers,
                    Some('%') => {
                        literal.push(b'%');
                        continue;
                    }
                    Some(other) => {
                        return Err(format!("unknown directive %{other} ({DIRECTIVES})"))
                    }
                    None => return Err(format!("a lone % ends the format ({DIRECTIVES})")),
                },
                '\\' => {
                    let escaped = match chars.next() {
                        Some('n') => b'\n',
                        Some('t') => b'\t',
                        Some('r') => b'\r',
                        Some('0') => 0,
                        Some('\\') => b'\\',
                        Some(other) => {
                            return Err(format!("unknown escape \\{other} ({DIRECTIVES})"))
                        }
                        None => return Err(format!("a lone \\ ends the format ({DIRECTIVES})")),
                    };
                    literal.push(escaped);
                    continue;
                }
                other => {
                    let mut buffer = [0; 4];
                    literal.extend_from_slice(other.encode_utf8(&mut buffer).as_bytes());
                    continue;
                }
            };
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(piece);
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Ok(Template { pieces })
    }

    /// Writes one message; bytes of keys, values and headers go out as
    /// they are, as kcat does.
    pub fn write(&self, out: &mut impl Write, message: &Message) -> io::Result<()> {
        for piece in &self.pieces {
            match piece {
                Piece::Literal(bytes) => out.write_all(bytes)?,
                Piece::Topic => out.write_all(message.topic.as_bytes())?,
                Piece::Partition => write!(out, "{}", message.partition)?,
                Piece::Offset => write!(out, "{}", message.offset)?,
                Piece::Key => out.write_all(message.key.as_deref().unwrap_or_default())?,
                Piece::KeyLength => match &message.key {
                    Some(key) => write!(out, "{}", key.len())?,
                    None => out.write_all(b"-1")?,
                },
                Piece::Value => out.write_all(&message.value)?,
                Piece::ValueLength => write!(out, "{}", message.value.len())?,
                Piece::Timestamp => write!(out, "{}", message.timestamp)?,
                Piece::Headers => {
                    for (i, (name, value)) in message.headers.iter().enumerate() {
                        if i > 0 {
                            out.write_all(b",")?;
                        }
                        out.write_all(name.as_bytes())?;
                        out.write_all(b"=")?;
                        out.write_all(value)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pubsub_etcd::Record;

    use super::*;

    fn message() -> Message {
        let record = Record::new("hello")
            .key("k1")
            .header("a", "1")
            .header("b", "2")
            .timestamp(1_700_000_000_000);
        Message::from_record("orders", 3, 42, record)
    }

    fn render(format: &str, message: &Message) -> String {
        let mut out = Vec::new();
        Template::parse(format)
            .unwrap()
            .write(&mut out, message)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_directive() {
        assert_eq!(
            render("%t %p %o %k(%K) %s(%S) %T [%h] 100%%\\n", &message()),
            "orders 3 42 k1(2) hello(5) 1700000000000 [a=1,b=2] 100%\n"
        );
        let mut keyless = message();
        keyless.key = None;
        keyless.headers = BTreeMap::new();
        assert_eq!(render("%k|%K|%h|\\t✓", &keyless), "|-1||\t✓");
    }

    #[test]
    fn mistakes_are_named() {
        assert!(Template::parse("%x").unwrap_err().contains("%x"));
        assert!(Template::parse("50%").unwrap_err().contains("lone %"));
        assert!(Template::parse("\\q").unwrap_err().contains("\\q"));
    }
}

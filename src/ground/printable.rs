//! How names from watched folders are shown to people: in `putonly status`,
//! in error messages and in the log.
//!
//! File and folder names are chosen by producers, and a producer may be
//! hostile: a name holding an escape sequence could clear or rewrite an
//! operator's terminal, and one holding a newline could forge a log line.
//! [`printable`] escapes every control character of a name (`\n`, `\u{1b}`)
//! and leaves everything else, non-ASCII letters included, as it is.
//! [`OneLine`] wraps the text log's writer so that one event is one line
//! whatever its fields hold (the log formatter already escapes terminal
//! escapes, not line breaks). This module never changes what is stored or
//! sent: keys and journal records keep the exact names.

use std::borrow::Cow;
use std::io::Write;

/// `s` with every control character escaped as Rust writes it (`\n`,
/// `\t`, `\u{1b}`); `s` itself when it has none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A writer for the text log: each write (the formatter writes one event
/// at a time) keeps its final line break, and every other `\n` or `\r` in
/// it is written as `\n` or `\r`.
pub struct OneLine<W>(pub W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let (body, end) = match buf.strip_suffix(b"\n") {
            Some(body) => (body, &b"\n"[..]),
            None => (buf, &b""[..]),
        };
        if !body.iter().any(|b| matches!(b, b'\n' | b'\r')) {
            return self.0.write_all(buf);
        }
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in body {
            match b {
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b => out.push(b),
            }
        }
        out.extend_from_slice(end);
        self.0.write_all(&out)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_nothing_else() {
        assert_eq!(printable("plain/été.csv"), "plain/été.csv");
        assert_eq!(
            printable("a\u{1b}[2Jb\nc\td\u{9b}"),
            "a\\u{1b}[2Jb\\nc\\td\\u{9b}"
        );
    }

    #[test]
    fn one_event_is_one_line() {
        let mut w = OneLine(Vec::new());
        w.write_all(b"INFO uploaded path=a\nFORGED line\r\n")
            .unwrap();
        w.write_all(b"INFO next\n").unwrap();
        assert_eq!(
            String::from_utf8(w.0).unwrap(),
            "INFO uploaded path=a\\nFORGED line\\r\nINFO next\n"
        );
    }
}

//! coreflect's own note in the cores it writes: name `COREFLECT`, type [`NT_COREFLECT`],
//! a descriptor of `key=value` lines (UTF-8, one per line, values without newlines).
//! Debuggers skip notes whose owner they do not know (checked with gdb, lldb, eu-readelf
//! and eu-stack by the tests).
//!
//! Keys: `version`, `mode`, `level`, `filter` (hex, when `--filter` was given), `pause_us`
//! (or, in suspend mode, `pause`: the target stays stopped for the whole write),
//! `write_path` (asked for: `auto`, `splice`, `read`, `pwrite`; corrected once the write is
//! done to the path used: `splice+direct`, `splice+buffered`, `read`, `pwrite`; padded to a
//! fixed width), `output` (`file`, `stream`), `compression`, `created` (Unix time), and
//! one `warning` line per warning known when the notes were written. Unknown keys are kept.

/// The note's owner name.
pub const NOTE_NAME: &str = "COREFLECT";
/// The note's type ("CFLT").
pub const NT_COREFLECT: u32 = 0x544c_4643;

/// Width every `write_path` value is padded to.
pub const WRITE_PATH_WIDTH: usize = 16;

/// What the `COREFLECT` note says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Every `key=value` line, in order (`warning` may repeat).
    pub entries: Vec<(String, String)>,
}

impl Metadata {
    /// Adds an entry (newlines in the value become spaces).
    pub fn push(&mut self, key: &str, value: impl std::fmt::Display) {
        let v = value.to_string().replace(['\n', '\r'], " ");
        self.entries.push((key.to_string(), v));
    }

    /// The first value of `key`, trimmed.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim())
    }

    /// Every value of `key` (e.g. `warning`).
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The note's descriptor.
    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        for (k, v) in &self.entries {
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('\n');
        }
        s.into_bytes()
    }

    /// Parses a descriptor; lines without `=` are ignored, invalid UTF-8 is replaced.
    pub fn parse(desc: &[u8]) -> Metadata {
        let text = String::from_utf8_lossy(desc);
        Metadata {
            entries: text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// A `write_path` value padded to [`WRITE_PATH_WIDTH`].
pub fn write_path_value(path: &str) -> String {
    let mut v: String = path.chars().take(WRITE_PATH_WIDTH).collect();
    while v.len() < WRITE_PATH_WIDTH {
        v.push(' ');
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut m = Metadata::default();
        m.push("version", "0.1.0");
        m.push("warning", "two\nlines");
        m.push("warning", "b=c");
        m.push("write_path", write_path_value("splice+direct"));
        let p = Metadata::parse(&m.encode());
        assert_eq!(p.get("version"), Some("0.1.0"));
        assert_eq!(p.all("warning"), vec!["two lines", "b=c"]);
        assert_eq!(p.get("write_path"), Some("splice+direct"));
        assert_eq!(
            write_path_value("read").len(),
            write_path_value("splice+buffered").len()
        );
        assert_eq!(Metadata::parse(b"\xff\xfe\nnoequals\n").entries.len(), 0);
    }
}

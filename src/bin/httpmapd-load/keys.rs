//! The key set and which key each request asks for. Owns reading keys from a
//! map file (`--keys`: `KEY [VALUE]` lines as `httpmapd backend --map` reads
//! them) or generating them (`--keyspace`, `--prefix`, `--domain`), holding
//! them in one buffer, writing them as a map file (`--write-map`), and the
//! choice of key per request: uniform, in order (`--sequential`), or by Zipf
//! rank (`--zipf`, the sampler in `zipf.rs`).

use crate::zipf::Zipf;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where the keys come from.
#[derive(Clone, Debug)]
pub struct KeySource {
    pub file: Option<PathBuf>,
    pub keyspace: usize,
    pub prefix: String,
    pub domain: String,
}

/// The key set (and the values for `--populate` / `--write-map`), in one buffer.
#[derive(Default)]
pub struct Keys {
    bytes: Vec<u8>,
    /// (key end, value end) per key; a key starts at the previous value end.
    ends: Vec<(usize, usize)>,
}

impl Keys {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1].1 };
        &self.bytes[start..self.ends[i].0]
    }

    pub fn value(&self, i: usize) -> &[u8] {
        &self.bytes[self.ends[i].0..self.ends[i].1]
    }

    fn push(&mut self, k: &[u8], v: &[u8]) {
        self.bytes.extend_from_slice(k);
        let ke = self.bytes.len();
        self.bytes.extend_from_slice(v);
        self.ends.push((ke, self.bytes.len()));
    }

    /// Reads map-file text: the first word of a line is the key, the rest
    /// (trimmed) the value (the key itself when there is none); blank lines
    /// and lines starting with `#` are skipped; CRLF line ends accepted.
    fn parse_map(text: &[u8]) -> Keys {
        let mut keys = Keys::default();
        for line in text.split(|&b| b == b'\n') {
            let line = line.trim_ascii();
            if line.is_empty() || line[0] == b'#' {
                continue;
            }
            match line.iter().position(|b| b.is_ascii_whitespace()) {
                Some(i) => keys.push(&line[..i], line[i..].trim_ascii()),
                None => keys.push(line, line),
            }
        }
        keys
    }

    /// The key set as map-file text (`KEY VALUE` lines).
    pub fn to_map(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes.len() + 2 * self.len());
        for i in 0..self.len() {
            out.extend_from_slice(self.key(i));
            out.push(b' ');
            out.extend_from_slice(self.value(i));
            out.push(b'\n');
        }
        out
    }
}

/// Loads the key set: the file's keys, or `PREFIX{i}@DOMAIN` for i in
/// 0..keyspace with the values `PREFIX{i}@mail.DOMAIN`.
pub fn load(src: &KeySource) -> Result<Keys, String> {
    if let Some(f) = &src.file {
        let text = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        let keys = Keys::parse_map(&text);
        if keys.len() == 0 {
            return Err(format!("{}: no keys", f.display()));
        }
        return Ok(keys);
    }
    let mut keys = Keys::default();
    for i in 0..src.keyspace {
        let k = format!("{}{i}@{}", src.prefix, src.domain);
        let v = format!("{}{i}@mail.{}", src.prefix, src.domain);
        keys.push(k.as_bytes(), v.as_bytes());
    }
    Ok(keys)
}

/// Writes the key set as a map file.
pub fn write_map(keys: &Keys, path: &Path) -> Result<(), String> {
    std::fs::write(path, keys.to_map()).map_err(|e| format!("{}: {e}", path.display()))
}

/// How requests pick their key.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeyOrder {
    /// Uniformly at random.
    Uniform,
    /// 0, 1, 2, ... across every connection and thread, wrapping around.
    Sequential,
    /// Zipf with this exponent: rank r (key index r-1) in proportion to 1/r^s.
    Zipf(f64),
}

/// Picks key indexes for one phase; shared by its threads.
pub struct Chooser {
    len: usize,
    order: KeyOrder,
    next: AtomicUsize,
    zipf: Option<Zipf>,
}

impl Chooser {
    pub fn new(len: usize, order: KeyOrder) -> Chooser {
        let zipf = match order {
            KeyOrder::Zipf(s) => Some(Zipf::new(len as u64, s)),
            _ => None,
        };
        Chooser {
            len,
            order,
            next: AtomicUsize::new(0),
            zipf,
        }
    }

    pub fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        match (&self.order, &self.zipf) {
            (KeyOrder::Sequential, _) => self.next.fetch_add(1, Ordering::Relaxed) % self.len,
            (KeyOrder::Zipf(_), Some(z)) => (z.sample(rng) - 1) as usize,
            _ => rng.usize(..self.len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_file_syntax() {
        let k = Keys::parse_map(
            b"# comment\n\nalice@example.com   alice@mail.example.com\r\n  \
              team@example.com alice@example.com, bob@example.com  \nexample.com\n   # indented comment\n",
        );
        assert_eq!(k.len(), 3);
        assert_eq!(k.key(0), b"alice@example.com");
        assert_eq!(k.value(0), b"alice@mail.example.com");
        assert_eq!(k.key(1), b"team@example.com");
        assert_eq!(k.value(1), b"alice@example.com, bob@example.com");
        assert_eq!(k.key(2), b"example.com");
        assert_eq!(k.value(2), b"example.com");
        assert_eq!(
            k.to_map(),
            b"alice@example.com alice@mail.example.com\n\
              team@example.com alice@example.com, bob@example.com\n\
              example.com example.com\n"
        );
    }

    #[test]
    fn the_demo_map_is_read_as_the_demo_backend_reads_it() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/demo.map");
        let src = KeySource {
            file: Some(path.into()),
            keyspace: 1,
            prefix: String::new(),
            domain: String::new(),
        };
        let k = load(&src).unwrap();
        assert!(k.len() >= 3);
        assert_eq!(k.key(0), b"alice@example.com");
        assert_eq!(k.value(0), b"alice@mail.example.com");
    }

    #[test]
    fn generated_keys() {
        let src = KeySource {
            file: None,
            keyspace: 3,
            prefix: "u".into(),
            domain: "d.test".into(),
        };
        let k = load(&src).unwrap();
        assert_eq!(
            k.to_map(),
            b"u0@d.test u0@mail.d.test\nu1@d.test u1@mail.d.test\nu2@d.test u2@mail.d.test\n"
        );
    }

    #[test]
    fn sequential_wraps_and_zipf_rank_one_is_index_zero() {
        let mut rng = fastrand::Rng::with_seed(1);
        let c = Chooser::new(3, KeyOrder::Sequential);
        let got: Vec<usize> = (0..7).map(|_| c.pick(&mut rng)).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
        let c = Chooser::new(5, KeyOrder::Zipf(2.0));
        let mut counts = [0u32; 5];
        for _ in 0..10_000 {
            counts[c.pick(&mut rng)] += 1;
        }
        assert!(counts.windows(2).all(|w| w[0] > w[1]), "{counts:?}");
        let c = Chooser::new(4, KeyOrder::Uniform);
        assert!((0..1000).all(|_| c.pick(&mut rng) < 4));
    }
}

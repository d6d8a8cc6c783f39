//! FASTQ: per-file read statistics, plain or gzip (detected by its magic bytes), read with
//! our own line reader so that everything the format allows is accepted and everything else
//! is refused at its line.
//!
//! Accepted, as the Sanger format and scikit-bio allow: blank or whitespace-only lines
//! before, between and after records; whitespace around a line; sequence and quality
//! wrapped over several lines (a quality line may begin with `@`: the quality ends when it
//! is as long as the sequence); a `+` line that repeats the title or is bare. Refused, with
//! the file's line (and column where it helps): a missing or empty title, a blank line
//! inside a record, a `+` line naming another title, bytes outside the sequence or quality
//! alphabets (whitespace inside a line included), quality longer or shorter than the
//! sequence, a record with no sequence, a truncated record, FASTA.
//!
//! Counted: reads, bases, mean read length, mean Phred quality and GC fraction (over
//! A/C/G/T, so `N` is excluded). The quality encoding is inferred from the byte range: a
//! byte below `;` means Phred+33 (Sanger, Illumina 1.8+); otherwise, when some byte lies
//! above `J`, bytes from `;` up mean Solexa+64 (old Solexa/Illumina before 1.3: its scores
//! start at -5) and bytes from `@` up Phred+64 (Illumina 1.3–1.7); otherwise Phred+33.
//! Solexa scores are converted to Phred, `Q = 10·log10(10^(S/10) + 1)`, before averaging.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::ItemSummary;

/// The inferred quality encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QualityEncoding {
    Phred33,
    Phred64,
    /// Solexa scores (log-odds) with offset 64: converted to Phred.
    Solexa64,
}

/// Where a FASTQ file is wrong: 1-based line (and column), in renkei's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastqError {
    /// 0 when the problem is the whole file (unreadable, empty).
    pub line: u64,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for FastqError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => f.write_str(&self.message),
            (line, None) => write!(f, "line {line}: {}", self.message),
            (line, Some(column)) => write!(f, "line {line}, column {column}: {}", self.message),
        }
    }
}

impl FastqError {
    /// The error as `file:line[:column]: message`.
    pub fn located(&self, file: &str) -> String {
        match (self.line, self.column) {
            (0, _) => format!("{file}: {}", self.message),
            (line, None) => format!("{file}:{line}: {}", self.message),
            (line, Some(column)) => format!("{file}:{line}:{column}: {}", self.message),
        }
    }

    fn at(line: u64, message: impl Into<String>) -> Self {
        Self {
            line,
            column: None,
            message: message.into(),
        }
    }

    fn at_column(line: u64, column: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            column: Some(column),
            message: message.into(),
        }
    }
}

/// Running totals over a file.
#[derive(Debug)]
struct Totals {
    reads: u64,
    bases: u64,
    gc: u64,
    acgt: u64,
    /// How many times each quality byte occurs.
    qualities: [u64; 128],
}

impl Default for Totals {
    fn default() -> Self {
        Self {
            reads: 0,
            bases: 0,
            gc: 0,
            acgt: 0,
            qualities: [0; 128],
        }
    }
}

impl Totals {
    fn encoding(&self) -> QualityEncoding {
        let present = |b: &usize| self.qualities[*b] > 0;
        let (Some(min), Some(max)) = ((0..128).find(present), (0..128).rev().find(present)) else {
            return QualityEncoding::Phred33;
        };
        match (min, max) {
            (min, _) if min < usize::from(b';') => QualityEncoding::Phred33,
            (min, max) if max > usize::from(b'J') && min < usize::from(b'@') => {
                QualityEncoding::Solexa64
            }
            (_, max) if max > usize::from(b'J') => QualityEncoding::Phred64,
            _ => QualityEncoding::Phred33,
        }
    }

    /// The mean Phred quality per base under `encoding`.
    fn mean_quality(&self, encoding: QualityEncoding) -> f64 {
        let phred = |byte: usize| -> f64 {
            match encoding {
                QualityEncoding::Phred33 => byte as f64 - 33.0,
                QualityEncoding::Phred64 => byte as f64 - 64.0,
                QualityEncoding::Solexa64 => {
                    let solexa = byte as f64 - 64.0;
                    10.0 * (10f64.powf(solexa / 10.0) + 1.0).log10()
                }
            }
        };
        let (sum, count) = self
            .qualities
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .fold((0.0, 0u64), |(sum, count), (byte, n)| {
                (sum + phred(byte) * *n as f64, count + n)
            });
        if count == 0 { 0.0 } else { sum / count as f64 }
    }
}

/// The longest line read (a whole read of a long-read platform fits many times over); a
/// longer one is refused rather than held in memory.
const MAX_LINE_BYTES: usize = 64 << 20;

/// Lines of a file with their 1-based numbers, each stripped of its line ending and of
/// whitespace at both ends.
struct Lines<R> {
    reader: R,
    number: u64,
    buffer: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    fn next(&mut self) -> Result<Option<(u64, &[u8])>, FastqError> {
        self.buffer.clear();
        let read = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut self.buffer)
            .map_err(|e| FastqError::at(self.number + 1, format!("cannot be read: {e}")))?;
        if read == 0 {
            return Ok(None);
        }
        if self.buffer.len() > MAX_LINE_BYTES {
            return Err(FastqError::at(
                self.number + 1,
                format!("a line longer than {MAX_LINE_BYTES} bytes (not a FASTQ file?)"),
            ));
        }
        self.number += 1;
        Ok(Some((self.number, self.buffer.trim_ascii())))
    }
}

/// Opens `path`, through gzip when it starts with gzip's magic bytes.
fn open(path: &Path) -> Result<Box<dyn BufRead>, FastqError> {
    let unreadable = |e: std::io::Error| FastqError::at(0, format!("cannot be read: {e}"));
    let mut file = File::open(path).map_err(unreadable)?;
    let mut magic = [0u8; 2];
    let got = file.read(&mut magic).map_err(unreadable)?;
    let file = File::open(path).map_err(unreadable)?;
    Ok(if got == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    })
}

fn is_base(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || b"*-.".contains(&byte)
}

/// Reads and summarises a FASTQ file; the error names the line (and column) that is wrong.
pub fn summarise(path: &Path) -> Result<(ItemSummary, QualityEncoding), FastqError> {
    let mut lines = Lines {
        reader: open(path)?,
        number: 0,
        buffer: Vec::new(),
    };
    let mut totals = Totals::default();
    let mut sequence: Vec<u8> = Vec::new();
    loop {
        // A record's title, after any blank lines.
        let (title_line, title) = loop {
            match lines.next()? {
                None => {
                    return finish(totals);
                }
                Some((_, [])) => {}
                Some((number, line)) => break (number, line.to_vec()),
            }
        };
        let Some(title) = title.strip_prefix(b"@") else {
            return Err(FastqError::at(
                title_line,
                if title.starts_with(b">") {
                    "a FASTA record, expected FASTQ".to_string()
                } else {
                    "expected a record's title line starting with '@'".to_string()
                },
            ));
        };
        let title = title.to_vec();
        if title.trim_ascii().is_empty() {
            return Err(FastqError::at(title_line, "the record has no title"));
        }
        let name = String::from_utf8_lossy(&title).into_owned();
        let ends_inside = |last: u64, what: &str| {
            FastqError::at(
                last,
                format!(
                    "the file ends inside record '{name}' (its title is on line {title_line}): {what}"
                ),
            )
        };
        // Sequence lines, up to the '+' line.
        sequence.clear();
        let plus_line = loop {
            let last = lines.number;
            let Some((number, line)) = lines.next()? else {
                return Err(ends_inside(last, "no '+' line"));
            };
            if line.is_empty() {
                return Err(FastqError::at(
                    number,
                    format!("a blank line inside record '{name}'"),
                ));
            }
            if let Some(rest) = line.strip_prefix(b"+") {
                if !rest.is_empty() && rest != title.as_slice() {
                    return Err(FastqError::at(
                        number,
                        format!("the '+' line repeats a different title than '{name}'"),
                    ));
                }
                break number;
            }
            if line.starts_with(b"@") {
                return Err(FastqError::at(
                    number,
                    format!("a new title before record '{name}' had its '+' line and quality"),
                ));
            }
            if let Some(i) = line.iter().position(|b| !is_base(*b)) {
                return Err(FastqError::at_column(
                    number,
                    i + 1,
                    format!("byte 0x{:02x} in record '{name}' is not a base", line[i]),
                ));
            }
            sequence.extend_from_slice(line);
        };
        if sequence.is_empty() {
            return Err(FastqError::at(
                plus_line,
                format!("record '{name}' has no sequence"),
            ));
        }
        // Quality lines, until as long as the sequence.
        let mut quality_len = 0usize;
        while quality_len < sequence.len() {
            let last = lines.number;
            let Some((number, line)) = lines.next()? else {
                return Err(ends_inside(
                    last,
                    &format!("{quality_len} quality values for {} bases", sequence.len()),
                ));
            };
            if line.is_empty() {
                return Err(FastqError::at(
                    number,
                    format!("a blank line inside record '{name}'"),
                ));
            }
            if let Some(i) = line.iter().position(|q| !(33..=126).contains(q)) {
                return Err(FastqError::at_column(
                    number,
                    i + 1,
                    format!(
                        "byte 0x{:02x} in record '{name}' is not a printable quality",
                        line[i]
                    ),
                ));
            }
            quality_len += line.len();
            if quality_len > sequence.len() {
                return Err(FastqError::at(
                    number,
                    format!(
                        "record '{name}' has {quality_len} quality values for {} bases",
                        sequence.len()
                    ),
                ));
            }
            for &q in line {
                totals.qualities[usize::from(q)] += 1;
            }
        }
        totals.reads += 1;
        totals.bases += sequence.len() as u64;
        for base in &sequence {
            match base | 0x20 {
                b'g' | b'c' => {
                    totals.gc += 1;
                    totals.acgt += 1;
                }
                b'a' | b't' => totals.acgt += 1,
                _ => {}
            }
        }
    }
}

fn finish(totals: Totals) -> Result<(ItemSummary, QualityEncoding), FastqError> {
    if totals.reads == 0 {
        return Err(FastqError::at(0, "the file holds no reads"));
    }
    let encoding = totals.encoding();
    let mean_length = totals.bases as f64 / totals.reads as f64;
    let mean_quality = totals.mean_quality(encoding);
    let gc = if totals.acgt > 0 {
        totals.gc as f64 / totals.acgt as f64
    } else {
        0.0
    };
    let fixed = |value: f64, scale: i32| Some((value * 10f64.powi(scale)).round() as i64);
    Ok((
        ItemSummary {
            values: vec![
                i64::try_from(totals.reads).ok(),
                i64::try_from(totals.bases).ok(),
                fixed(mean_length, 1),
                fixed(mean_quality.max(0.0), 2),
                fixed(gc, 4),
            ],
            details: vec![(
                "quality_encoding".into(),
                match encoding {
                    QualityEncoding::Phred33 => "phred33",
                    QualityEncoding::Phred64 => "phred64",
                    QualityEncoding::Solexa64 => "solexa64",
                }
                .into(),
            )],
        },
        encoding,
    ))
}

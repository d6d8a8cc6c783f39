//! FASTQ: per-file read statistics, plain or gzip (detected by its magic bytes), with
//! needletail and the checks it leaves to us.
//!
//! Counted: reads, bases, mean read length, mean Phred quality and GC fraction (over
//! A/C/G/T, so `N` is excluded). The quality encoding is inferred from the byte range: any
//! byte below `;` means Phred+33; all bytes from `@` up with some beyond `J` means Phred+64
//! (old Illumina); otherwise Phred+33 is assumed. Refused, with the record's line: a title
//! that is missing or differs on the `+` line, sequence and quality of different lengths,
//! bytes outside the sequence or quality alphabets, truncated records, FASTA.

use std::path::Path;

use needletail::errors::ParseError;
use needletail::parser::Format;

use super::ItemSummary;

/// The inferred quality encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QualityEncoding {
    Phred33,
    Phred64,
}

/// Running totals over a file.
#[derive(Debug, Default)]
struct Totals {
    reads: u64,
    bases: u64,
    gc: u64,
    acgt: u64,
    quality_sum: u64,
    quality_min: u8,
    quality_max: u8,
}

impl Totals {
    fn encoding(&self) -> QualityEncoding {
        if self.bases > 0 && self.quality_min >= b'@' && self.quality_max > b'J' {
            QualityEncoding::Phred64
        } else {
            QualityEncoding::Phred33
        }
    }
}

fn parse_error(error: &ParseError) -> String {
    format!("{:?}: {error}", error.kind)
}

/// Reads and summarises a FASTQ file; the error names the line and record that are wrong.
pub fn summarise(path: &Path) -> Result<(ItemSummary, QualityEncoding), String> {
    let mut reader = needletail::parse_fastx_file(path).map_err(|e| parse_error(&e))?;
    let mut totals = Totals {
        quality_min: u8::MAX,
        ..Totals::default()
    };
    while let Some(record) = reader.next() {
        let record =
            record.map_err(|e| format!("after record {}: {}", totals.reads, parse_error(&e)))?;
        let line = record.start_line_number();
        let title = record.id();
        let at = || format!("line {line} (record '{}')", String::from_utf8_lossy(title));
        if record.format() != Format::Fastq {
            return Err(format!("{}: a FASTA record, expected FASTQ", at()));
        }
        if title.is_empty() {
            return Err(format!("line {line}: the record has no title"));
        }
        let plus = record.all().split(|b| *b == b'\n').nth(2).unwrap_or(b"+");
        let plus = plus.strip_suffix(b"\r").unwrap_or(plus);
        if plus.len() > 1 && &plus[1..] != title {
            return Err(format!("{}: the '+' line repeats a different title", at()));
        }
        let sequence = record.raw_seq();
        let quality = record.qual().unwrap_or(b"");
        if let Some(i) = sequence
            .iter()
            .position(|b| !(b.is_ascii_alphabetic() || b"*-.".contains(b)))
        {
            return Err(format!(
                "{}: sequence byte 0x{:02x} at column {} is not a base",
                at(),
                sequence[i],
                i + 1
            ));
        }
        if let Some(i) = quality.iter().position(|q| !(33..=126).contains(q)) {
            return Err(format!(
                "{}: quality byte 0x{:02x} at column {} is not a printable quality",
                at(),
                quality[i],
                i + 1
            ));
        }
        totals.reads += 1;
        totals.bases += sequence.len() as u64;
        for base in sequence {
            match base | 0x20 {
                b'g' | b'c' => {
                    totals.gc += 1;
                    totals.acgt += 1;
                }
                b'a' | b't' => totals.acgt += 1,
                _ => {}
            }
        }
        for &q in quality {
            totals.quality_sum += u64::from(q);
            totals.quality_min = totals.quality_min.min(q);
            totals.quality_max = totals.quality_max.max(q);
        }
    }
    if totals.reads == 0 {
        return Err("the file holds no reads".into());
    }
    let encoding = totals.encoding();
    let offset = match encoding {
        QualityEncoding::Phred33 => 33.0,
        QualityEncoding::Phred64 => 64.0,
    };
    let mean_length = totals.bases as f64 / totals.reads as f64;
    let mean_quality = if totals.bases > 0 {
        totals.quality_sum as f64 / totals.bases as f64 - offset
    } else {
        0.0
    };
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
                format!("{encoding:?}").to_lowercase(),
            )],
        },
        encoding,
    ))
}

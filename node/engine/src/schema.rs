//! Dataset schemas: which views a node offers, their columns, types, levels, bounds and
//! units, and which information kinds exist. Read from TOML; `covid19` ships as the default
//! (`node/schemas/covid19.toml`). A new disease is a new schema file, not new code.
//!
//! Every value is stored as an integer: integers as themselves, decimals as fixed-point
//! integers (`value × 10^scale`), categorical levels by their position, booleans as 0/1.
//! Absence (`NULL`) is kept apart. Bounds are what numeric aggregates clamp to and what
//! ingestion enforces.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use renkei_protocol::{Decimal, Literal};
use serde::Deserialize;

/// The default schema, compiled in.
pub const COVID19: &str = include_str!("../../schemas/covid19.toml");

/// What to do with a decimal that has more digits after the point than its column keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Digits {
    /// Refuse it: nothing is rounded in silence (the default).
    #[default]
    Exact,
    /// Round it half away from zero, and count it.
    Round,
}

/// Why a schema file is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaFileError {
    #[error("schema does not parse: {0}")]
    Parse(String),
    #[error("schema is inconsistent: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A column's type, with the values it takes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ColumnType {
    Integer {
        min: i64,
        max: i64,
    },
    Decimal {
        min: f64,
        max: f64,
        /// Digits kept after the decimal point.
        scale: u8,
    },
    Categorical {
        levels: Vec<String>,
    },
    Boolean,
}

/// One column of a view.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(flatten)]
    pub kind: ColumnType,
}

/// A kind of information item (a file kept at the hospital and summarised on ingest).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemKind {
    pub kind: String,
    pub format: ItemFormat,
    /// Human-genome and similar data: policies treat its view strictly.
    #[serde(default)]
    pub sensitive: bool,
    /// A consent scope the patient must have given, besides secondary use.
    #[serde(default)]
    pub consent: Option<String>,
}

/// How an item's file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ItemFormat {
    Dicom,
    Fastq,
}

impl ItemFormat {
    /// The summary columns of an item of this format (one view row per item).
    pub fn columns(self) -> Vec<ColumnDef> {
        let int = |name: &str, max: i64| ColumnDef {
            name: name.into(),
            description: None,
            unit: None,
            kind: ColumnType::Integer { min: 0, max },
        };
        let dec = |name: &str, max: f64, scale: u8| ColumnDef {
            name: name.into(),
            description: None,
            unit: None,
            kind: ColumnType::Decimal {
                min: 0.0,
                max,
                scale,
            },
        };
        // Levels in order, each once, then `other`.
        let level = |name: &str, description: &str, levels: Vec<&str>| {
            let mut unique: Vec<String> = Vec::new();
            for level in levels.into_iter().chain(["other"]) {
                if !unique.iter().any(|u| u == level) {
                    unique.push(level.to_string());
                }
            }
            ColumnDef {
                name: name.into(),
                description: Some(description.into()),
                unit: None,
                kind: ColumnType::Categorical { levels: unique },
            }
        };
        match self {
            ItemFormat::Dicom => vec![
                ColumnDef {
                    name: "modality".into(),
                    description: Some("DICOM (0008,0060)".into()),
                    unit: None,
                    kind: ColumnType::Categorical {
                        levels: DICOM_MODALITIES.iter().map(|m| m.to_string()).collect(),
                    },
                },
                int("rows", 65_535),
                int("columns", 65_535),
                int("frames", 100_000),
                dec("slice_thickness", 100.0, 2),
                // Added after the first five: older stored items read them as missing.
                level(
                    "sop_class",
                    "DICOM (0008,0016), by storage class",
                    DICOM_SOP_CLASSES.iter().map(|(_, level)| *level).collect(),
                ),
                level("body_part", "DICOM (0018,0015)", DICOM_BODY_PARTS.to_vec()),
                level(
                    "manufacturer",
                    "DICOM (0008,0070), by vendor",
                    DICOM_MANUFACTURERS
                        .iter()
                        .map(|(_, level)| *level)
                        .collect(),
                ),
            ],
            ItemFormat::Fastq => vec![
                int("read_count", i64::from(u32::MAX)),
                int("total_bases", 1 << 48),
                dec("mean_read_length", 1_000_000.0, 1),
                dec("mean_quality", 100.0, 2),
                dec("gc_fraction", 1.0, 4),
            ],
        }
    }
}

/// DICOM storage classes kept as levels (by SOP Class UID); others are `other`.
pub const DICOM_SOP_CLASSES: &[(&str, &str)] = &[
    ("1.2.840.10008.5.1.4.1.1.2", "ct"),
    ("1.2.840.10008.5.1.4.1.1.2.1", "enhanced_ct"),
    ("1.2.840.10008.5.1.4.1.1.4", "mr"),
    ("1.2.840.10008.5.1.4.1.1.4.1", "enhanced_mr"),
    ("1.2.840.10008.5.1.4.1.1.1", "cr"),
    ("1.2.840.10008.5.1.4.1.1.1.1", "dx"),
    ("1.2.840.10008.5.1.4.1.1.1.1.1", "dx"),
    ("1.2.840.10008.5.1.4.1.1.128", "pet"),
    ("1.2.840.10008.5.1.4.1.1.130", "pet"),
    ("1.2.840.10008.5.1.4.1.1.7", "secondary_capture"),
];

/// DICOM Body Part Examined values kept as levels (lower case); the spine's parts are
/// `spine`; others are `other`.
pub const DICOM_BODY_PARTS: &[&str] = &[
    "chest",
    "lung",
    "heart",
    "head",
    "brain",
    "neck",
    "abdomen",
    "pelvis",
    "abdomenpelvis",
    "chestabdomen",
    "spine",
    "wholebody",
    "extremity",
];

/// Vendors kept as levels, by a word their Manufacturer value contains; others are `other`.
pub const DICOM_MANUFACTURERS: &[(&str, &str)] = &[
    ("GE ", "ge"),
    ("SIEMENS", "siemens"),
    ("PHILIPS", "philips"),
    ("TOSHIBA", "canon"),
    ("CANON", "canon"),
    ("FUJI", "fujifilm"),
    ("HITACHI", "hitachi"),
];

/// DICOM modalities kept as levels; others are stored as `OT` (other).
pub const DICOM_MODALITIES: &[&str] = &["CT", "MR", "CR", "DX", "PT", "NM", "US", "XA", "MG", "OT"];

/// The consent scope every query needs.
pub const SECONDARY_USE: &str = "secondary_use";

/// A dataset schema.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSchema {
    pub name: String,
    pub version: u32,
    /// Each patient's contribution to timepoint-level answers is bounded by this.
    pub max_timepoints_per_patient: u32,
    pub patients: Vec<ColumnDef>,
    pub timepoints: Vec<ColumnDef>,
    #[serde(default)]
    pub items: Vec<ItemKind>,
    /// The time axis the day columns share; absent in schemas written before it.
    #[serde(default)]
    pub time: Option<TimeAxis>,
}

/// What day 0 is and how time is counted. Every integer column whose unit is the axis's unit
/// is a day column: an offset from the patient's own origin. No calendar date is stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeAxis {
    /// What day 0 is for each patient (e.g. symptom onset).
    pub origin: String,
    /// The unit of every day column (only `days`).
    pub unit: String,
    /// The input column holding each patient's origin as a calendar date. A file with it
    /// may give day columns as dates; ingest turns them into days from the origin.
    #[serde(default)]
    pub origin_date: Option<String>,
    /// Day columns that count from another event (e.g. `days_since_admission`): a day count
    /// still, but never computed from the origin date.
    #[serde(default)]
    pub other_origins: Vec<String>,
}

/// The only unit of time a schema may declare.
pub const DAYS: &str = "days";

/// Most consent scopes a schema may name (`secondary_use` included): each is one bit of a
/// stored patient row.
pub const MAX_CONSENT_SCOPES: usize = 64;

/// Names every view and column use that are not schema columns.
pub const PATIENTS_VIEW: &str = "patients";
pub const TIMEPOINTS_VIEW: &str = "timepoints";
/// The timepoint's number within its patient, a column of the timepoint and item views.
pub const TIMEPOINT_COLUMN: &str = "timepoint";

impl DatasetSchema {
    pub fn covid19() -> Result<Self, SchemaFileError> {
        Self::from_toml(COVID19)
    }

    pub fn from_toml(text: &str) -> Result<Self, SchemaFileError> {
        let schema: Self =
            toml::from_str(text).map_err(|e| SchemaFileError::Parse(e.to_string()))?;
        schema.validate()?;
        Ok(schema)
    }

    pub fn read_file(path: &Path) -> Result<Self, SchemaFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    fn validate(&self) -> Result<(), SchemaFileError> {
        let invalid = |reason: String| Err(SchemaFileError::Invalid(reason));
        if self.max_timepoints_per_patient == 0 {
            return invalid("max_timepoints_per_patient must be at least 1".into());
        }
        let reserved = [TIMEPOINT_COLUMN, "patient_id"];
        // A timepoint column may share a patient column's name (e.g. `severity`): in the
        // timepoint views it shadows it, and the patient's is `patients.<name>`.
        for (level, columns) in [("patient", &self.patients), ("timepoint", &self.timepoints)] {
            let mut seen = BTreeSet::new();
            for column in columns {
                if !seen.insert(column.name.as_str()) || reserved.contains(&column.name.as_str()) {
                    return invalid(format!(
                        "{level} column `{}` is defined twice or reserved",
                        column.name
                    ));
                }
            }
        }
        let names: BTreeSet<&str> = self
            .patients
            .iter()
            .chain(&self.timepoints)
            .map(|c| c.name.as_str())
            .collect();
        for column in self.patients.iter().chain(&self.timepoints) {
            if !column
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return invalid(format!("column `{}` is not snake_case", column.name));
            }
            match &column.kind {
                ColumnType::Integer { min, max } if min > max => {
                    return invalid(format!("column `{}`: min > max", column.name));
                }
                ColumnType::Decimal { min, max, scale }
                    if !(min.is_finite() && max.is_finite() && min <= max) || *scale > 9 =>
                {
                    return invalid(format!(
                        "column `{}`: decimal bounds or scale (at most 9) are wrong",
                        column.name
                    ));
                }
                ColumnType::Categorical { levels } if levels.is_empty() || levels.len() > 1024 => {
                    return invalid(format!("column `{}` needs 1 to 1024 levels", column.name));
                }
                _ => {}
            }
        }
        if let Some(time) = &self.time {
            if time.unit != DAYS {
                return invalid(format!(
                    "time unit `{}` is not supported; day columns count `{DAYS}`",
                    time.unit
                ));
            }
            if let Some(origin) = &time.origin_date
                && (names.contains(origin.as_str()) || reserved.contains(&origin.as_str()))
            {
                return invalid(format!(
                    "time origin_date `{origin}` clashes with a column: it is read, never stored"
                ));
            }
        }
        let scopes: BTreeSet<&str> = self
            .items
            .iter()
            .filter_map(|item| item.consent.as_deref())
            .chain([SECONDARY_USE])
            .collect();
        if scopes.len() > MAX_CONSENT_SCOPES {
            return invalid(format!(
                "{} consent scopes (with `{SECONDARY_USE}`); a node tells at most {MAX_CONSENT_SCOPES} apart",
                scopes.len()
            ));
        }
        let mut kinds = BTreeSet::new();
        for item in &self.items {
            if !kinds.insert(item.kind.as_str())
                || names.contains(item.kind.as_str())
                || [PATIENTS_VIEW, TIMEPOINTS_VIEW].contains(&item.kind.as_str())
            {
                return invalid(format!(
                    "item kind `{}` clashes with another name",
                    item.kind
                ));
            }
        }
        Ok(())
    }

    /// Whether `def` counts days from the time origin, so a date given in it becomes days
    /// from the patient's origin date.
    pub fn counts_from_origin(&self, def: &ColumnDef) -> bool {
        self.time
            .as_ref()
            .is_some_and(|time| def.is_day() && !time.other_origins.contains(&def.name))
    }

    /// The input column that gives each patient's origin as a date, if the schema has one.
    pub fn origin_date_column(&self) -> Option<&str> {
        self.time.as_ref()?.origin_date.as_deref()
    }

    pub fn item(&self, kind: &str) -> Option<&ItemKind> {
        self.items.iter().find(|i| i.kind == kind)
    }

    pub fn patient_column(&self, name: &str) -> Option<(usize, &ColumnDef)> {
        self.patients
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
    }

    pub fn timepoint_column(&self, name: &str) -> Option<(usize, &ColumnDef)> {
        self.timepoints
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == name)
    }

    /// Every view: `patients`, `timepoints`, then one per information kind.
    pub fn views(&self) -> Vec<&str> {
        let mut views = vec![PATIENTS_VIEW, TIMEPOINTS_VIEW];
        views.extend(self.items.iter().map(|i| i.kind.as_str()));
        views
    }

    /// The derived presence flag of an information kind (`has_ct`, …).
    pub fn presence_column(kind: &str) -> String {
        format!("has_{kind}")
    }
}

/// Why a literal does not fit a column.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

impl ColumnDef {
    /// The stored integer for a literal compared with this column.
    pub fn encode_literal(&self, literal: &Literal) -> Result<i64, ValueError> {
        let wrong = |what: &str| {
            ValueError(format!(
                "`{}` is {}; it cannot be compared with {what}",
                self.name,
                self.kind.describe()
            ))
        };
        match (&self.kind, literal) {
            (ColumnType::Integer { .. }, Literal::Integer(n)) => Ok(*n),
            (ColumnType::Integer { .. }, Literal::Decimal(d)) => {
                // An integer column compared with a fractional value: exact only if whole.
                let divisor = 10i64.pow(u32::from(d.scale));
                if d.digits % divisor == 0 {
                    Ok(d.digits / divisor)
                } else {
                    Err(wrong(&format!("the fraction {d}")))
                }
            }
            (ColumnType::Decimal { scale, .. }, Literal::Integer(n)) => rescale(
                &Decimal {
                    digits: *n,
                    scale: 0,
                },
                *scale,
            )
            .ok_or_else(|| wrong(&format!("{n} (out of range)"))),
            (ColumnType::Decimal { scale, .. }, Literal::Decimal(d)) => rescale(d, *scale)
                .ok_or_else(|| {
                    ValueError(format!(
                        "`{}` keeps {scale} digits after the point; {d} has more",
                        self.name
                    ))
                }),
            (ColumnType::Categorical { levels }, Literal::Text(text)) => levels
                .iter()
                .position(|l| l == text)
                .map(|i| i as i64)
                .ok_or_else(|| {
                    ValueError(format!(
                        "`{text}` is not a level of `{}`; levels: {}",
                        self.name,
                        levels.join(", ")
                    ))
                }),
            (ColumnType::Boolean, Literal::Bool(b)) => Ok(i64::from(*b)),
            (_, other) => Err(wrong(&other.to_string())),
        }
    }

    /// Parses an input cell (CSV, FHIR) into the stored integer; `None` for an empty cell.
    pub fn parse_cell(&self, cell: &str) -> Result<Option<i64>, ValueError> {
        self.parse_cell_with(cell, Digits::Exact)
            .map(|(value, _)| value)
    }

    /// [`ColumnDef::parse_cell`] under a rule for decimals with more digits than the column
    /// keeps; also says whether the value was rounded.
    pub fn parse_cell_with(
        &self,
        cell: &str,
        digits: Digits,
    ) -> Result<(Option<i64>, bool), ValueError> {
        let mut rounded = false;
        let cell = trim_cell(cell);
        if cell.is_empty() || cell.eq_ignore_ascii_case("na") || cell.eq_ignore_ascii_case("null") {
            return Ok((None, false));
        }
        let out_of_range = |shown: &str| {
            ValueError(format!(
                "`{shown}` is outside {} for `{}`",
                self.kind.describe(),
                self.name
            ))
        };
        let value = match &self.kind {
            ColumnType::Integer { min, max } => {
                let n: i64 = cell
                    .parse()
                    .map_err(|_| ValueError(format!("`{cell}` is not an integer")))?;
                if n < *min || n > *max {
                    return Err(out_of_range(cell));
                }
                n
            }
            ColumnType::Decimal { min, max, scale } => {
                let decimal = parse_decimal(cell)
                    .ok_or_else(|| ValueError(format!("`{cell}` is not a number")))?;
                let extra = decimal.scale > *scale && {
                    let divisor = 10i64.checked_pow(u32::from(decimal.scale - scale));
                    divisor.is_none_or(|d| decimal.digits % d != 0)
                };
                let stored = match (extra, digits) {
                    (false, Digits::Exact | Digits::Round) => rescale(&decimal, *scale),
                    (true, Digits::Round) => {
                        rounded = true;
                        round_to_scale(&decimal, *scale)
                    }
                    (true, Digits::Exact) => {
                        return Err(ValueError(format!(
                            "`{cell}` has more digits after the point than the {scale} `{}` keeps; round it in the file, or load with --round to round such values (half away from zero)",
                            self.name
                        )));
                    }
                }
                .ok_or_else(|| out_of_range(cell))?;
                let lo = (min * 10f64.powi(i32::from(*scale))).floor() as i64;
                let hi = (max * 10f64.powi(i32::from(*scale))).ceil() as i64;
                if stored < lo || stored > hi {
                    return Err(out_of_range(cell));
                }
                stored
            }
            ColumnType::Categorical { levels } => levels
                .iter()
                .position(|l| l.eq_ignore_ascii_case(cell))
                .map(|i| i as i64)
                .ok_or_else(|| {
                    ValueError(format!("`{cell}` is not one of: {}", levels.join(", ")))
                })?,
            ColumnType::Boolean => match parse_flag(cell) {
                Some(flag) => i64::from(flag),
                None => {
                    return Err(ValueError(format!(
                        "`{cell}` is not true/false, yes/no or 1/0"
                    )));
                }
            },
        };
        Ok((Some(value), rounded))
    }

    /// Whether the column counts days from the time origin (an integer in `days`).
    pub fn is_day(&self) -> bool {
        matches!(self.kind, ColumnType::Integer { .. }) && self.unit.as_deref() == Some(DAYS)
    }

    /// The stored integer as text, for reports.
    pub fn display_value(&self, stored: i64) -> String {
        match &self.kind {
            ColumnType::Integer { .. } => stored.to_string(),
            ColumnType::Decimal { scale, .. } => Decimal {
                digits: stored,
                scale: *scale,
            }
            .to_string(),
            ColumnType::Categorical { levels } => usize::try_from(stored)
                .ok()
                .and_then(|i| levels.get(i))
                .cloned()
                .unwrap_or_else(|| format!("#{stored}")),
            ColumnType::Boolean => (stored != 0).to_string(),
        }
    }
}

impl ColumnType {
    fn describe(&self) -> String {
        match self {
            ColumnType::Integer { min, max } => format!("an integer in [{min}, {max}]"),
            ColumnType::Decimal { min, max, scale } => {
                format!("a decimal in [{min}, {max}] with {scale} digits after the point")
            }
            ColumnType::Categorical { levels } => format!("categorical ({})", levels.join(", ")),
            ColumnType::Boolean => "a true/false flag".into(),
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `cell` without surrounding whitespace; a cell that starts and ends with a visible ASCII
/// character (nearly every one) is returned as it is without a scan.
pub fn trim_cell(cell: &str) -> &str {
    match (cell.as_bytes().first(), cell.as_bytes().last()) {
        (Some(first), Some(last)) if first.is_ascii_graphic() && last.is_ascii_graphic() => cell,
        _ => cell.trim(),
    }
}

/// Parses a yes/no cell: true/false, yes/no, 1/0, y/n, t/f in any case.
pub fn parse_flag(cell: &str) -> Option<bool> {
    let is = |words: [&str; 5]| words.iter().any(|w| w.eq_ignore_ascii_case(cell));
    if is(["true", "yes", "1", "y", "t"]) {
        Some(true)
    } else if is(["false", "no", "0", "n", "f"]) {
        Some(false)
    } else {
        None
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The day (since 1970-01-01) of `2020-03-01` or `2020-03-01T10:00:00Z`: the date part of
/// an ISO 8601 date or date-time, which must be a real calendar day.
pub fn parse_day(text: &str) -> Option<i64> {
    let date = text.get(..10)?;
    if text.len() > 10 && !text[10..].starts_with(['T', ' ']) {
        return None;
    }
    let bytes = date.as_bytes();
    if bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = &date[range];
        part.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, m, d) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let last = *month_days.get(usize::try_from(m - 1).ok()?)?;
    (1..=last).contains(&d).then(|| days_from_civil(y, m, d))
}

/// Parses `-12.345` exactly.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = body.split_once('.').unwrap_or((body, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .chars()
            .chain(fraction.chars())
            .all(|c| c.is_ascii_digit())
        || fraction.len() > 18
    {
        return None;
    }
    let digits = whole
        .bytes()
        .chain(fraction.bytes())
        .try_fold(0i64, |n, digit| {
            n.checked_mul(10)?.checked_add(i64::from(digit - b'0'))
        })?;
    Some(Decimal {
        digits: if negative { -digits } else { digits },
        scale: u8::try_from(fraction.len()).ok()?,
    })
}

/// `decimal` at exactly `scale` digits, or `None` if that loses digits or overflows.
pub fn rescale(decimal: &Decimal, scale: u8) -> Option<i64> {
    if decimal.scale <= scale {
        decimal
            .digits
            .checked_mul(10i64.checked_pow(u32::from(scale - decimal.scale))?)
    } else {
        let divisor = 10i64.checked_pow(u32::from(decimal.scale - scale))?;
        (decimal.digits % divisor == 0).then_some(decimal.digits / divisor)
    }
}

/// `decimal` rounded (half away from zero) to `scale` digits.
fn round_to_scale(decimal: &Decimal, scale: u8) -> Option<i64> {
    if decimal.scale <= scale {
        return rescale(decimal, scale);
    }
    let divisor = 10i64.checked_pow(u32::from(decimal.scale - scale))?;
    let quotient = decimal.digits / divisor;
    let remainder = (decimal.digits % divisor).abs();
    let round_up = remainder * 2 >= divisor;
    Some(if round_up {
        quotient + decimal.digits.signum()
    } else {
        quotient
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days_are_exact() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2000-03-01T10:00:00Z"), Some(11_017));
        assert_eq!(parse_day("2000-03-01 10:00"), Some(11_017));
        assert_eq!(parse_day("2020-02-29"), Some(18_321));
        assert_eq!(parse_day("2020-03-01"), Some(18_322));
        assert_eq!(parse_day("1969-12-31"), Some(-1));
        for not_a_day in [
            "2021-02-29",
            "1900-02-29",
            "2020-13-01",
            "2020-04-31",
            "2020-00-10",
            "2020-1-01",
            "2020/01/01",
            "+020-01-01",
            "2020-01-01x",
            "20",
            "",
        ] {
            assert_eq!(parse_day(not_a_day), None, "{not_a_day}");
        }
    }

    #[test]
    fn a_time_axis_counts_days_and_its_origin_date_is_not_a_column() {
        let schema = DatasetSchema::covid19().unwrap();
        assert_eq!(schema.origin_date_column(), Some("onset_date"));
        assert!(schema.patient_column("death_day").unwrap().1.is_day());
        assert!(!schema.patient_column("age").unwrap().1.is_day());
        let death_day = schema.patient_column("death_day").unwrap().1;
        let since_admission = schema.timepoint_column("days_since_admission").unwrap().1;
        assert!(schema.counts_from_origin(death_day));
        assert!(since_admission.is_day() && !schema.counts_from_origin(since_admission));
        for (from, to) in [
            ("unit = \"days\"", "unit = \"hours\""),
            ("origin_date = \"onset_date\"", "origin_date = \"age\""),
        ] {
            let text = COVID19.replacen(from, to, 1);
            assert!(
                matches!(
                    DatasetSchema::from_toml(&text),
                    Err(SchemaFileError::Invalid(_))
                ),
                "{to}"
            );
        }
    }

    #[test]
    fn the_covid19_schema_loads() {
        let schema = DatasetSchema::covid19().unwrap();
        assert_eq!(schema.name, "covid19");
        assert!(schema.patient_column("age").is_some());
        assert!(schema.timepoint_column("il6").is_some());
        assert!(schema.item("host_genome").unwrap().sensitive);
        assert_eq!(
            schema.views(),
            vec![
                "patients",
                "timepoints",
                "ct",
                "viral_genome",
                "host_genome",
                "rna_seq",
                "immune_repertoire"
            ]
        );
    }

    #[test]
    fn cells_and_literals_encode_exactly() {
        let schema = DatasetSchema::covid19().unwrap();
        let (_, crp) = schema.timepoint_column("crp").unwrap();
        assert_eq!(crp.parse_cell("1.25").unwrap(), Some(125));
        // Digits beyond the column's are refused unless rounding is asked for; zeros are
        // no digits lost.
        let refused = crp.parse_cell("1.234").unwrap_err();
        assert!(refused.0.contains("--round"), "{}", refused.0);
        assert_eq!(crp.parse_cell("1.250").unwrap(), Some(125));
        assert_eq!(
            crp.parse_cell_with("1.255", Digits::Round).unwrap(),
            (Some(126), true)
        );
        assert_eq!(
            crp.parse_cell_with("1.254", Digits::Round).unwrap(),
            (Some(125), true)
        );
        assert_eq!(
            crp.parse_cell_with("1.25", Digits::Round).unwrap(),
            (Some(125), false)
        );
        assert_eq!(crp.parse_cell("").unwrap(), None);
        assert!(crp.parse_cell("51").is_err());
        assert!(crp.parse_cell("high").is_err());
        assert_eq!(
            crp.encode_literal(&Literal::Decimal(Decimal {
                digits: 15,
                scale: 1
            }))
            .unwrap(),
            150
        );
        assert!(
            crp.encode_literal(&Literal::Decimal(Decimal {
                digits: 1234,
                scale: 3
            }))
            .is_err()
        );
        let (_, sex) = schema.patient_column("sex").unwrap();
        assert_eq!(sex.parse_cell("Female").unwrap(), Some(0));
        let err = sex.encode_literal(&Literal::Text("f".into())).unwrap_err();
        assert!(err.0.contains("female, male, other"), "{err}");
        assert_eq!(sex.display_value(1), "male");
        assert_eq!(crp.display_value(-5), "-0.05");
    }

    #[test]
    fn a_schema_names_at_most_64_consent_scopes() {
        let with_scopes = |n: usize| {
            let mut text = COVID19.to_string();
            for i in 0..n {
                text.push_str(&format!(
                    "\n[[items]]\nkind = \"extra_{i}\"\nformat = \"fastq\"\nconsent = \"scope_{i}\"\n"
                ));
            }
            DatasetSchema::from_toml(&text)
        };
        // covid19 has `secondary_use` and `genome`: 62 more fit, 63 do not.
        assert!(with_scopes(62).is_ok());
        let error = with_scopes(63).unwrap_err().to_string();
        assert!(error.contains("65 consent scopes"), "{error}");
    }

    #[test]
    fn cells_lose_surrounding_whitespace() {
        for (cell, trimmed) in [
            ("7", "7"),
            (" 7\t", "7"),
            ("\u{a0}yes\u{a0}", "yes"),
            ("", ""),
            (" ", ""),
        ] {
            assert_eq!(trim_cell(cell), trimmed, "{cell:?}");
        }
    }

    #[test]
    fn decimals_parse_exactly() {
        assert_eq!(
            parse_decimal("-12.340"),
            Some(Decimal {
                digits: -12340,
                scale: 3
            })
        );
        assert_eq!(
            parse_decimal("0.0"),
            Some(Decimal {
                digits: 0,
                scale: 1
            })
        );
        assert_eq!(
            parse_decimal("7"),
            Some(Decimal {
                digits: 7,
                scale: 0
            })
        );
        assert_eq!(parse_decimal("1e3"), None);
        assert_eq!(parse_decimal("."), None);
        assert_eq!(parse_decimal("1.-5"), None);
        // Leading zeros cost nothing; more digits than an i64 holds do not parse.
        assert_eq!(
            parse_decimal("000000000000000000000001.5"),
            Some(Decimal {
                digits: 15,
                scale: 1
            })
        );
        assert_eq!(parse_decimal("99999999999999999999"), None);
    }
}

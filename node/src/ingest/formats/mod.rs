//! Readers for the information items a hospital keeps as files: DICOM images and FASTQ
//! reads. Each turns a file into a summary (the item format's columns plus descriptive
//! details) or an error naming where the file is broken. File contents never enter the
//! store.

pub mod dicom;
pub mod fastq;

/// A file's summary: values for the format's columns (in [`renkei_engine::schema::ItemFormat::columns`]
/// order) and descriptive, non-identifying details.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemSummary {
    pub values: Vec<Option<i64>>,
    pub details: Vec<(String, String)>,
}

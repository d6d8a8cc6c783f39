//! DICOM: the header of a Part-10 file, read with dicom-rs.
//!
//! The whole file is parsed (so a file cut short anywhere, pixel data included, is refused),
//! but only these header fields are kept: modality, SOP class, study date, body part, rows ×
//! columns, slice thickness, number of frames and manufacturer. Identifying fields (patient
//! name, id, birth date, institution) are never read into the summary, and pixel data is
//! dropped with the parsed object.

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};

use super::ItemSummary;
use renkei_engine::schema::DICOM_MODALITIES;

/// The error's chain of causes (dicom-rs puts the tag and position in the causes).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Reads and summarises a DICOM file; the error names the tag or position that is wrong.
pub fn summarise(path: &Path) -> Result<ItemSummary, String> {
    let object: DefaultDicomObject = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| format!("not a readable DICOM file: {}", chain(&e)))?;
    let text = |tag: Tag| -> Result<Option<String>, String> {
        object
            .get(tag)
            .map(|e| e.to_str().map(|v| v.trim().to_string()))
            .transpose()
            .map_err(|e| format!("DICOM tag {tag}: {}", chain(&e)))
    };
    let integer = |tag: Tag| -> Result<Option<i64>, String> {
        object
            .get(tag)
            .map(|e| e.to_int::<i64>())
            .transpose()
            .map_err(|e| format!("DICOM tag {tag}: {}", chain(&e)))
    };
    let modality = text(tags::MODALITY)?;
    let modality_level = modality.as_deref().map(|m| {
        DICOM_MODALITIES
            .iter()
            .position(|known| known.eq_ignore_ascii_case(m))
            .unwrap_or(DICOM_MODALITIES.len() - 1) as i64
    });
    let slice_thickness = object
        .get(tags::SLICE_THICKNESS)
        .map(|e| e.to_float64())
        .transpose()
        .map_err(|e| format!("DICOM tag {}: {}", tags::SLICE_THICKNESS, chain(&e)))?
        .filter(|t| t.is_finite() && *t >= 0.0)
        .map(|t| (t * 100.0).round() as i64);
    let mut details = Vec::new();
    for (name, tag) in [
        ("modality", tags::MODALITY),
        ("sop_class_uid", tags::SOP_CLASS_UID),
        ("study_date", tags::STUDY_DATE),
        ("body_part", tags::BODY_PART_EXAMINED),
        ("manufacturer", tags::MANUFACTURER),
    ] {
        if let Some(value) = text(tag)?.filter(|v| !v.is_empty()) {
            details.push((name.to_string(), value));
        }
    }
    Ok(ItemSummary {
        values: vec![
            modality_level,
            integer(tags::ROWS)?,
            integer(tags::COLUMNS)?,
            integer(tags::NUMBER_OF_FRAMES)?.or(Some(1)),
            slice_thickness,
        ],
        details,
    })
}

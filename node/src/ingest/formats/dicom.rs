//! DICOM: the header of a Part-10 file, read with dicom-rs.
//!
//! The whole file is parsed (so a file cut short anywhere, pixel data included, is refused),
//! but only these header fields are kept: modality, SOP class, study date, body part, rows ×
//! columns, slice thickness (for enhanced and multi-frame objects, from the shared or the
//! first frame's functional group), number of frames and manufacturer. Modality, SOP class
//! (by storage class), body part and manufacturer (by vendor) are queryable levels; the
//! study date is kept only as a detail, never released. Identifying fields (patient
//! name, id, birth date, institution) are never read into the summary, and pixel data is
//! dropped with the parsed object.

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions, Tag};
use renkei_engine::schema::{
    ColumnType, DICOM_BODY_PARTS, DICOM_MANUFACTURERS, DICOM_MODALITIES, DICOM_SOP_CLASSES,
    ItemFormat,
};

use super::ItemSummary;

/// The stored level of `level` in the DICOM view's column `column`, as the schema lists its
/// levels (the schema is the one place their order is decided); `other` when unknown.
fn level_in(column: &str, level: Option<&str>) -> Option<i64> {
    let columns = ItemFormat::Dicom.columns();
    let levels = columns
        .iter()
        .find(|c| c.name == column)
        .and_then(|c| match &c.kind {
            ColumnType::Categorical { levels } => Some(levels),
            ColumnType::Integer { .. } | ColumnType::Decimal { .. } | ColumnType::Boolean => None,
        })?;
    let at = |name: &str| levels.iter().position(|l| l == name);
    level.and_then(at).or_else(|| at("other")).map(|i| i as i64)
}

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
    // Enhanced and multi-frame objects keep the slice thickness in their functional groups:
    // the shared group, else the first frame's.
    let thickness_in = |object: &InMemDicomObject| -> Result<Option<f64>, String> {
        object
            .get(tags::SLICE_THICKNESS)
            .map(|e| e.to_float64())
            .transpose()
            .map_err(|e| format!("DICOM tag {}: {}", tags::SLICE_THICKNESS, chain(&e)))
    };
    let in_group = |sequence: Tag| -> Result<Option<f64>, String> {
        let measures = object
            .get(sequence)
            .and_then(|e| e.items())
            .and_then(|groups| groups.first())
            .and_then(|group| group.get(tags::PIXEL_MEASURES_SEQUENCE))
            .and_then(|e| e.items())
            .and_then(|items| items.first());
        measures.map_or(Ok(None), thickness_in)
    };
    let slice_thickness = match object
        .get(tags::SLICE_THICKNESS)
        .map(|e| e.to_float64())
        .transpose()
        .map_err(|e| format!("DICOM tag {}: {}", tags::SLICE_THICKNESS, chain(&e)))?
    {
        Some(thickness) => Some(thickness),
        None => match in_group(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE)? {
            Some(thickness) => Some(thickness),
            None => in_group(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)?,
        },
    }
    .filter(|t| t.is_finite() && *t >= 0.0)
    .map(|t| (t * 100.0).round() as i64);
    let present = |value: Option<String>| value.filter(|v| !v.is_empty());
    let sop_class = present(text(tags::SOP_CLASS_UID)?).and_then(|uid| {
        let level = DICOM_SOP_CLASSES
            .iter()
            .find(|(known, _)| *known == uid)
            .map(|(_, level)| *level);
        level_in("sop_class", level)
    });
    let body_part = present(text(tags::BODY_PART_EXAMINED)?).and_then(|part| {
        let part = part.to_ascii_lowercase();
        let part = if part.ends_with("spine") {
            "spine".to_string()
        } else {
            part
        };
        let level = DICOM_BODY_PARTS
            .iter()
            .find(|known| **known == part)
            .copied();
        level_in("body_part", level)
    });
    let manufacturer = present(text(tags::MANUFACTURER)?).and_then(|name| {
        let name = format!("{} ", name.to_ascii_uppercase());
        let level = DICOM_MANUFACTURERS
            .iter()
            .find(|(word, _)| name.contains(word))
            .map(|(_, level)| *level);
        level_in("manufacturer", level)
    });
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
            sop_class,
            body_part,
            manufacturer,
        ],
        details,
    })
}

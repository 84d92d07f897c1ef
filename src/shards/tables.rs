//! The per-shard scores table (one row per scored sample) and error table (one row per sample
//! that could not be scored, with its cause), written as parquet. Columns: docs/shards.md.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    Float32Builder, Float64Builder, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

/// Where in the path a sample failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Read,
    Group,
    Decode,
    Infer,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Group => "group",
            Stage::Decode => "decode",
            Stage::Infer => "infer",
        }
    }
}

/// The cause of an error row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    TruncatedMember,
    TruncatedShard,
    NoImage,
    MultipleImages,
    DuplicateMember,
    NonUtf8Name,
    /// The image column of a parquet row is null or empty.
    NullImage,
    Undecodable,
    UnsupportedFormat,
    Oversize,
    /// The encoder failed on this image alone.
    Inference,
    /// A worker dead-lettered the sample for another reason (`collect`).
    DeadLetter,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::TruncatedMember => "truncated_member",
            ErrorKind::TruncatedShard => "truncated_shard",
            ErrorKind::NoImage => "no_image",
            ErrorKind::MultipleImages => "multiple_images",
            ErrorKind::DuplicateMember => "duplicate_member",
            ErrorKind::NonUtf8Name => "non_utf8_name",
            ErrorKind::NullImage => "null_image",
            ErrorKind::Undecodable => "undecodable",
            ErrorKind::UnsupportedFormat => "unsupported_format",
            ErrorKind::Oversize => "oversize",
            ErrorKind::Inference => "inference",
            ErrorKind::DeadLetter => "dead_letter",
        }
    }

    /// The kind of a decoding failure.
    pub fn of_preprocess(e: &crate::model::preprocess::PreprocessError) -> ErrorKind {
        use crate::model::preprocess::PreprocessError as P;
        match e {
            P::UnsupportedFormat(_) | P::NotAnImage { .. } => ErrorKind::UnsupportedFormat,
            P::TooLarge { .. } | P::TooManyPixels { .. } | P::TooComplex { .. } => {
                ErrorKind::Oversize
            }
            _ => ErrorKind::Undecodable,
        }
    }
}

/// One scored sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScoreRow {
    pub key: String,
    pub shard: String,
    /// The image member (tar input).
    pub member: Option<String>,
    /// The row (parquet input).
    pub row: Option<u32>,
    pub uid: Option<String>,
    pub url: Option<String>,
    pub image_sha256: String,
    pub decision: String,
    pub score: f64,
    pub threshold: f64,
    pub method: String,
    pub top_labels: Vec<String>,
    pub top_scores: Vec<f32>,
    pub nearest_outliers: Vec<String>,
    pub bank_version: String,
    pub model_fingerprint: String,
}

/// One sample that could not be scored (or, with no key, the shard itself).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorRow {
    pub key: Option<String>,
    pub shard: String,
    pub member: Option<String>,
    pub row: Option<u32>,
    pub stage: Stage,
    pub kind: ErrorKind,
    pub message: String,
    /// Size of the image bytes, when there were any.
    pub bytes: Option<u64>,
}

impl ErrorRow {
    /// The shard-level row of a damaged tar (no key).
    pub fn truncated_shard(shard: &str, why: String) -> ErrorRow {
        ErrorRow {
            key: None,
            shard: shard.to_string(),
            member: None,
            row: None,
            stage: Stage::Read,
            kind: ErrorKind::TruncatedShard,
            message: why,
            bytes: None,
        }
    }
}

/// Snappy (what pyarrow and Spark default to; parquet's own default is no compression) and
/// row groups small enough that image bytes are never buffered in bulk.
pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1024))
        .set_max_row_group_bytes(Some(64 << 20))
        .build()
}

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn list_of(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, true))),
        false,
    )
}

pub fn scores_schema() -> Schema {
    Schema::new(vec![
        utf8("key", false),
        utf8("shard", false),
        utf8("member", true),
        Field::new("row", DataType::UInt32, true),
        utf8("uid", true),
        utf8("url", true),
        utf8("image_sha256", false),
        utf8("decision", false),
        Field::new("score", DataType::Float64, false),
        Field::new("threshold", DataType::Float64, false),
        utf8("method", false),
        list_of("top_labels", DataType::Utf8),
        list_of("top_scores", DataType::Float32),
        list_of("nearest_outliers", DataType::Utf8),
        utf8("bank_version", false),
        utf8("model_fingerprint", false),
    ])
}

pub fn errors_schema() -> Schema {
    Schema::new(vec![
        utf8("key", true),
        utf8("shard", false),
        utf8("member", true),
        Field::new("row", DataType::UInt32, true),
        utf8("stage", false),
        utf8("kind", false),
        utf8("message", false),
        Field::new("bytes", DataType::UInt64, true),
    ])
}

fn strings<'a>(v: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for s in v {
        b.append_option(s);
    }
    Arc::new(b.finish())
}

fn string_lists<'a>(v: impl Iterator<Item = &'a Vec<String>>) -> ArrayRef {
    let mut b = ListBuilder::new(StringBuilder::new());
    for l in v {
        for s in l {
            b.values().append_value(s);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

pub fn scores_batch(rows: &[ScoreRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mut row = UInt32Builder::new();
    let mut score = Float64Builder::new();
    let mut threshold = Float64Builder::new();
    let mut top_scores = ListBuilder::new(Float32Builder::new());
    for r in rows {
        row.append_option(r.row);
        score.append_value(r.score);
        threshold.append_value(r.threshold);
        for s in &r.top_scores {
            top_scores.values().append_value(*s);
        }
        top_scores.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| Some(r.key.as_str()))),
        strings(rows.iter().map(|r| Some(r.shard.as_str()))),
        strings(rows.iter().map(|r| r.member.as_deref())),
        Arc::new(row.finish()),
        strings(rows.iter().map(|r| r.uid.as_deref())),
        strings(rows.iter().map(|r| r.url.as_deref())),
        strings(rows.iter().map(|r| Some(r.image_sha256.as_str()))),
        strings(rows.iter().map(|r| Some(r.decision.as_str()))),
        Arc::new(score.finish()),
        Arc::new(threshold.finish()),
        strings(rows.iter().map(|r| Some(r.method.as_str()))),
        string_lists(rows.iter().map(|r| &r.top_labels)),
        Arc::new(top_scores.finish()),
        string_lists(rows.iter().map(|r| &r.nearest_outliers)),
        strings(rows.iter().map(|r| Some(r.bank_version.as_str()))),
        strings(rows.iter().map(|r| Some(r.model_fingerprint.as_str()))),
    ];
    RecordBatch::try_new(Arc::new(scores_schema()), cols)
}

pub fn errors_batch(rows: &[ErrorRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let mut row = UInt32Builder::new();
    let mut bytes = UInt64Builder::new();
    for r in rows {
        row.append_option(r.row);
        bytes.append_option(r.bytes);
    }
    let cols: Vec<ArrayRef> = vec![
        strings(rows.iter().map(|r| r.key.as_deref())),
        strings(rows.iter().map(|r| Some(r.shard.as_str()))),
        strings(rows.iter().map(|r| r.member.as_deref())),
        Arc::new(row.finish()),
        strings(rows.iter().map(|r| Some(r.stage.as_str()))),
        strings(rows.iter().map(|r| Some(r.kind.as_str()))),
        strings(rows.iter().map(|r| Some(r.message.as_str()))),
        Arc::new(bytes.finish()),
    ];
    RecordBatch::try_new(Arc::new(errors_schema()), cols)
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    #[error("{0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Writes `batch` as a parquet file at `path`; the file is returned for `sync_all`.
pub fn write_table(path: &Path, batch: &RecordBatch) -> Result<File, TableError> {
    let f = File::create(path)?;
    let mut w = ArrowWriter::try_new(f, batch.schema(), Some(writer_properties()))?;
    w.write(batch)?;
    Ok(w.into_inner()?)
}

/// Reads a whole parquet file (tables written by this module; tests and `collect`).
pub fn read_table(path: &Path) -> Result<Vec<RecordBatch>, TableError> {
    let f = File::open(path)?;
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)?.build()?;
    Ok(r.collect::<Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::cast::AsArray;
    use arrow_array::types::Float64Type;

    #[test]
    fn a_scores_table_reads_back_with_its_values() {
        let row = ScoreRow {
            key: "000010005".into(),
            shard: "a/00001.tar".into(),
            member: Some("000010005.jpg".into()),
            row: None,
            uid: Some("u1".into()),
            url: None,
            image_sha256: "ab".into(),
            decision: "ood".into(),
            score: -0.25,
            threshold: 0.5,
            method: "ole".into(),
            top_labels: vec!["cat".into(), "dog".into()],
            top_scores: vec![0.3, 0.2],
            nearest_outliers: vec!["rock".into()],
            bank_version: "v1".into(),
            model_fingerprint: "fp".into(),
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.parquet");
        write_table(&p, &scores_batch(&[row.clone(), row]).unwrap()).unwrap();
        let back = read_table(&p).unwrap();
        let b = &back[0];
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.schema().as_ref(), &scores_schema());
        let score = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>();
        assert_eq!(score.value(1), -0.25);
        let labels = b.column_by_name("top_labels").unwrap().as_list::<i32>();
        assert_eq!(labels.value(0).as_string::<i32>().value(1), "dog");
        let e = ErrorRow {
            key: None,
            shard: "x.tar".into(),
            member: None,
            row: None,
            stage: Stage::Read,
            kind: ErrorKind::TruncatedShard,
            message: "cut".into(),
            bytes: None,
        };
        let p = dir.path().join("e.parquet");
        write_table(&p, &errors_batch(&[e]).unwrap()).unwrap();
        let b = &read_table(&p).unwrap()[0];
        let kind = b.column_by_name("kind").unwrap().as_string::<i32>();
        assert_eq!(kind.value(0), "truncated_shard");
        assert!(b.column_by_name("key").unwrap().is_null(0));
    }
}

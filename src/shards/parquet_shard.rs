//! Parquet shards: rows with an image-bytes column, read a batch at a time, and written back
//! with every input column in order plus `ood_score` and `ood_decision`.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::tables::writer_properties;

/// Column names taken as the image when none is given, in order (img2dataset names the
/// column after its encode format; Hugging Face uses `image`).
pub const IMAGE_COLUMNS: [&str; 9] = [
    "jpg",
    "jpeg",
    "png",
    "webp",
    "image",
    "img",
    "image_bytes",
    "bytes",
    "content",
];

/// The columns `filter` appends to a parquet shard.
pub const SCORE_COLUMN: &str = "ood_score";
pub const DECISION_COLUMN: &str = "ood_decision";

#[derive(Debug, thiserror::Error)]
pub enum ParquetShardError {
    #[error("{path}: {source}")]
    Parquet {
        path: String,
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: {source}")]
    Arrow {
        path: String,
        source: arrow_schema::ArrowError,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: no image column: give --image-column (columns: {columns}); a binary column, or a struct with a binary `bytes` field, is needed"
    )]
    NoImageColumn { path: String, columns: String },
    #[error("{path}: column {column} {why}")]
    BadColumn {
        path: String,
        column: String,
        why: String,
    },
}

/// How the image bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ImageColumn {
    Binary(usize),
    /// A Hugging Face `Image` column: `struct<bytes, path>`; (column, field).
    Struct(usize, usize),
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// The columns of one parquet layout that `filter` uses.
#[derive(Debug, Clone)]
pub struct Columns {
    image: ImageColumn,
    key: Option<usize>,
    status: Option<usize>,
    uid: Option<usize>,
    url: Option<usize>,
    pub image_name: String,
    pub key_name: Option<String>,
}

fn image_column(schema: &Schema, i: usize) -> Option<ImageColumn> {
    match schema.field(i).data_type() {
        t if is_binary(t) => Some(ImageColumn::Binary(i)),
        DataType::Struct(fields) => fields
            .iter()
            .position(|f| f.name() == "bytes" && is_binary(f.data_type()))
            .map(|j| ImageColumn::Struct(i, j)),
        _ => None,
    }
}

impl Columns {
    /// Finds the image and key columns: the named ones, else by name ([`IMAGE_COLUMNS`],
    /// `key`), else the only binary column; without a key column the row index is the key.
    pub fn detect(
        schema: &Schema,
        path: &str,
        image: Option<&str>,
        key: Option<&str>,
    ) -> Result<Columns, ParquetShardError> {
        let columns = || {
            schema
                .fields()
                .iter()
                .map(|f| format!("{} ({})", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let bad = |column: &str, why: String| ParquetShardError::BadColumn {
            path: path.into(),
            column: column.into(),
            why,
        };
        for reserved in [SCORE_COLUMN, DECISION_COLUMN] {
            if schema.index_of(reserved).is_ok() {
                return Err(bad(
                    reserved,
                    "is already present: this looks like a filtered output, not an input".into(),
                ));
            }
        }
        let image = match image {
            Some(name) => {
                let i = schema
                    .index_of(name)
                    .map_err(|_| bad(name, format!("does not exist (columns: {})", columns())))?;
                image_column(schema, i).ok_or_else(|| {
                    bad(
                        name,
                        format!("is {}, not binary image bytes", schema.field(i).data_type()),
                    )
                })?
            }
            None => {
                let by_name = IMAGE_COLUMNS.iter().find_map(|n| {
                    schema
                        .index_of(n)
                        .ok()
                        .and_then(|i| image_column(schema, i))
                });
                let candidates: Vec<ImageColumn> = (0..schema.fields().len())
                    .filter_map(|i| image_column(schema, i))
                    .collect();
                match (by_name, candidates.as_slice()) {
                    (Some(c), _) => c,
                    (None, [only]) => *only,
                    _ => {
                        return Err(ParquetShardError::NoImageColumn {
                            path: path.into(),
                            columns: columns(),
                        });
                    }
                }
            }
        };
        let key_idx = match key {
            Some(name) => Some(
                schema
                    .index_of(name)
                    .map_err(|_| bad(name, format!("does not exist (columns: {})", columns())))?,
            ),
            None => schema.index_of("key").ok(),
        };
        if let Some(k) = key_idx {
            let t = schema.field(k).data_type();
            if !(is_text(t)
                || matches!(
                    t,
                    DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64
                ))
            {
                return Err(bad(
                    schema.field(k).name(),
                    format!("is {t}; a key must be text or an integer"),
                ));
            }
        }
        let text_col = |n: &str| {
            schema
                .index_of(n)
                .ok()
                .filter(|&i| is_text(schema.field(i).data_type()))
        };
        let image_idx = match image {
            ImageColumn::Binary(i) | ImageColumn::Struct(i, _) => i,
        };
        Ok(Columns {
            image,
            key: key_idx,
            status: text_col("status"),
            uid: text_col("uid"),
            url: text_col("url"),
            image_name: schema.field(image_idx).name().clone(),
            key_name: key_idx.map(|k| schema.field(k).name().clone()),
        })
    }
}

/// One row of a parquet shard.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The row's position in the file.
    pub row: u32,
    pub key: String,
    /// `None` when the image cell is null.
    pub image: Option<Vec<u8>>,
    /// The `status` column says the row failed upstream (img2dataset keeps failed downloads).
    pub upstream_failure: bool,
    pub uid: Option<String>,
    pub url: Option<String>,
}

fn text_at(a: &ArrayRef, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Some(a.as_string_view().value(i).to_string()),
        DataType::Int32 => Some(a.as_primitive::<Int32Type>().value(i).to_string()),
        DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(i).to_string()),
        DataType::UInt32 => Some(a.as_primitive::<UInt32Type>().value(i).to_string()),
        DataType::UInt64 => Some(a.as_primitive::<UInt64Type>().value(i).to_string()),
        _ => None,
    }
}

fn binary_at(a: &dyn Array, i: usize) -> Option<Vec<u8>> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Binary => Some(a.as_binary::<i32>().value(i).to_vec()),
        DataType::LargeBinary => Some(a.as_binary::<i64>().value(i).to_vec()),
        DataType::BinaryView => Some(a.as_binary_view().value(i).to_vec()),
        _ => None,
    }
}

impl Columns {
    /// The rows of `batch`, the first being row `first` of the file.
    pub fn rows(&self, batch: &RecordBatch, first: u32) -> Vec<Row> {
        (0..batch.num_rows())
            .map(|i| {
                let row = first + i as u32;
                let image = match self.image {
                    ImageColumn::Binary(c) => binary_at(batch.column(c).as_ref(), i),
                    ImageColumn::Struct(c, f) => {
                        let s = batch.column(c).as_struct();
                        if s.is_null(i) {
                            None
                        } else {
                            binary_at(s.column(f).as_ref(), i)
                        }
                    }
                };
                let key = self
                    .key
                    .and_then(|k| text_at(batch.column(k), i))
                    .unwrap_or_else(|| row.to_string());
                let upstream_failure = self
                    .status
                    .and_then(|s| text_at(batch.column(s), i))
                    .is_some_and(|s| s != "success");
                Row {
                    row,
                    key,
                    image,
                    upstream_failure,
                    uid: self.uid.and_then(|c| text_at(batch.column(c), i)),
                    url: self.url.and_then(|c| text_at(batch.column(c), i)),
                }
            })
            .collect()
    }
}

/// Opens a parquet shard for reading `batch` rows at a time.
pub fn open(
    path: &Path,
    image: Option<&str>,
    key: Option<&str>,
    batch: usize,
) -> Result<(ParquetRecordBatchReader, Columns, SchemaRef), ParquetShardError> {
    let name = path.display().to_string();
    let f = File::open(path).map_err(|source| ParquetShardError::Io {
        path: name.clone(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|source| {
        ParquetShardError::Parquet {
            path: name.clone(),
            source,
        }
    })?;
    let schema = builder.schema().clone();
    let cols = Columns::detect(&schema, &name, image, key)?;
    let reader = builder
        .with_batch_size(batch.max(1))
        .build()
        .map_err(|source| ParquetShardError::Parquet { path: name, source })?;
    Ok((reader, cols, schema))
}

/// A filtered parquet shard being written: the input's columns plus the score columns.
pub struct ParquetOut {
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    pub rows: usize,
}

/// The output schema: every input column, then `ood_score` (float64) and `ood_decision`.
pub fn output_schema(input: &Schema) -> SchemaRef {
    let mut fields: Vec<Arc<Field>> = input.fields().iter().cloned().collect();
    fields.push(Arc::new(Field::new(SCORE_COLUMN, DataType::Float64, false)));
    fields.push(Arc::new(Field::new(DECISION_COLUMN, DataType::Utf8, false)));
    Arc::new(Schema::new_with_metadata(fields, input.metadata().clone()))
}

impl ParquetOut {
    pub fn create(path: &Path, input: &Schema) -> Result<ParquetOut, ParquetShardError> {
        let name = path.display().to_string();
        let f = File::create(path).map_err(|source| ParquetShardError::Io {
            path: name.clone(),
            source,
        })?;
        let schema = output_schema(input);
        let writer = ArrowWriter::try_new(f, schema.clone(), Some(writer_properties()))
            .map_err(|source| ParquetShardError::Parquet { path: name, source })?;
        Ok(ParquetOut {
            writer,
            schema,
            rows: 0,
        })
    }

    /// Appends rows `take` of `batch` (indices into it) with their scores and decisions.
    pub fn append(
        &mut self,
        batch: &RecordBatch,
        take: &[u32],
        scores: &[f64],
        decisions: &[&str],
    ) -> Result<(), ParquetShardError> {
        if take.is_empty() {
            return Ok(());
        }
        let arrow = |source| ParquetShardError::Arrow {
            path: "output".into(),
            source,
        };
        let picked =
            arrow_select::take::take_record_batch(batch, &UInt32Array::from(take.to_vec()))
                .map_err(arrow)?;
        let mut cols: Vec<ArrayRef> = picked.columns().to_vec();
        let mut s = Float64Builder::new();
        s.append_slice(scores);
        let mut d = StringBuilder::new();
        for x in decisions {
            d.append_value(x);
        }
        cols.push(Arc::new(s.finish()));
        cols.push(Arc::new(d.finish()));
        let out = RecordBatch::try_new(self.schema.clone(), cols).map_err(arrow)?;
        self.writer
            .write(&out)
            .map_err(|source| ParquetShardError::Parquet {
                path: "output".into(),
                source,
            })?;
        self.rows += take.len();
        Ok(())
    }

    /// Writes the footer; the file is returned for `sync_all`.
    pub fn finish(self) -> Result<File, ParquetShardError> {
        self.writer
            .into_inner()
            .map_err(|source| ParquetShardError::Parquet {
                path: "output".into(),
                source,
            })
    }
}

/// Splits img2dataset's metadata table of a shard (`00000.parquet` beside `00000.tar`: one row
/// per input row, no image bytes) into the rows of the samples `decide` sends to `id/` and to
/// `ood/`, written with the input's schema so each output tar keeps a matching table. Rows of
/// samples that were not scored go to neither. `Ok(false)` when the table has no `key` column
/// (nothing is written then).
pub fn split_metadata(
    src: &Path,
    decide: impl Fn(&str) -> Option<bool>,
    id_out: &Path,
    ood_out: &Path,
) -> Result<bool, ParquetShardError> {
    let name = src.display().to_string();
    let pq = |source| ParquetShardError::Parquet {
        path: name.clone(),
        source,
    };
    let f = File::open(src).map_err(|source| ParquetShardError::Io {
        path: name.clone(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(pq)?;
    let schema = builder.schema().clone();
    let Ok(key) = schema.index_of("key") else {
        return Ok(false);
    };
    let reader = builder.with_batch_size(1024).build().map_err(pq)?;
    let create = |p: &Path| -> Result<ArrowWriter<File>, ParquetShardError> {
        let f = File::create(p).map_err(|source| ParquetShardError::Io {
            path: p.display().to_string(),
            source,
        })?;
        ArrowWriter::try_new(f, schema.clone(), Some(writer_properties())).map_err(pq)
    };
    let mut outs = [create(id_out)?, create(ood_out)?];
    for rb in reader {
        let rb = rb.map_err(|source| ParquetShardError::Arrow {
            path: name.clone(),
            source,
        })?;
        let keys = rb.column(key);
        let mut picks: [Vec<u32>; 2] = Default::default();
        for i in 0..rb.num_rows() {
            if let Some(id) = text_at(keys, i).and_then(|k| decide(&k)) {
                picks[usize::from(!id)].push(i as u32);
            }
        }
        for (w, pick) in outs.iter_mut().zip(picks) {
            if pick.is_empty() {
                continue;
            }
            let part = arrow_select::take::take_record_batch(&rb, &UInt32Array::from(pick))
                .map_err(|source| ParquetShardError::Arrow {
                    path: name.clone(),
                    source,
                })?;
            w.write(&part).map_err(pq)?;
        }
    }
    for w in outs {
        w.close().map_err(pq)?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{BinaryBuilder, StructBuilder};
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::Fields;

    fn batch() -> RecordBatch {
        let mut img = BinaryBuilder::new();
        img.append_value(b"a");
        img.append_null();
        img.append_value(b"c");
        RecordBatch::try_from_iter(vec![
            (
                "caption",
                Arc::new(StringArray::from(vec!["x", "y", "z"])) as ArrayRef,
            ),
            ("jpg", Arc::new(img.finish()) as ArrayRef),
            (
                "key",
                Arc::new(Int64Array::from(vec![10, 11, 12])) as ArrayRef,
            ),
            (
                "status",
                Arc::new(StringArray::from(vec![
                    "success",
                    "failed_to_download",
                    "success",
                ])) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn img2dataset_rows_read_with_keys_and_upstream_failures() {
        let b = batch();
        let cols = Columns::detect(&b.schema(), "t", None, None).unwrap();
        assert_eq!(cols.image_name, "jpg");
        let rows = cols.rows(&b, 100);
        assert_eq!(rows[0].key, "10");
        assert_eq!(rows[0].row, 100);
        assert_eq!(rows[0].image.as_deref(), Some(&b"a"[..]));
        assert_eq!(rows[1].image, None);
        assert!(rows[1].upstream_failure);
        assert!(!rows[2].upstream_failure);
        let e = Columns::detect(&b.schema(), "t", Some("caption"), None).unwrap_err();
        assert!(
            e.to_string().contains("is Utf8, not binary image bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_hugging_face_image_struct_is_found() {
        let fields = Fields::from(vec![
            Field::new("bytes", DataType::Binary, true),
            Field::new("path", DataType::Utf8, true),
        ]);
        let mut s = StructBuilder::from_fields(fields, 1);
        s.field_builder::<BinaryBuilder>(0)
            .unwrap()
            .append_value(b"png!");
        s.field_builder::<StringBuilder>(1)
            .unwrap()
            .append_value("p.png");
        s.append(true);
        let b = RecordBatch::try_from_iter(vec![("picture", Arc::new(s.finish()) as ArrayRef)])
            .unwrap();
        let cols = Columns::detect(&b.schema(), "t", None, None).unwrap();
        let rows = cols.rows(&b, 0);
        assert_eq!(rows[0].image.as_deref(), Some(&b"png!"[..]));
        assert_eq!(rows[0].key, "0", "no key column: the row index");
    }

    #[test]
    fn output_keeps_every_column_and_adds_the_scores() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.parquet");
        let b = batch();
        let mut out = ParquetOut::create(&p, &b.schema()).unwrap();
        out.append(&b, &[2, 0], &[0.5, -1.0], &["id", "ood"])
            .unwrap();
        out.finish().unwrap();
        let back = crate::shards::tables::read_table(&p).unwrap();
        let r = &back[0];
        let names: Vec<&str> = r
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(
            names,
            [
                "caption",
                "jpg",
                "key",
                "status",
                "ood_score",
                "ood_decision"
            ]
        );
        assert_eq!(r.column(0).as_string::<i32>().value(0), "z");
        assert_eq!(r.column(5).as_string::<i32>().value(1), "ood");
        let e = Columns::detect(&r.schema(), "o", None, None).unwrap_err();
        assert!(e.to_string().contains("filtered output"), "{e}");
    }
}

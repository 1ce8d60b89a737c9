//! Evaluation text: WikiText-2 raw test from the Hugging Face hub (what the
//! original `validate_perplexity.py` measured), or any local text file.
//!
//! The hub path goes through [`crate::model::hub`], so the standard cache
//! (`HF_HUB_CACHE`, `HF_HOME`), mirror (`HF_ENDPOINT`) and `HF_HUB_OFFLINE`
//! behave as they do for the Python tools and for the model; a local file is
//! read byte for byte, because perplexity depends on every byte the
//! tokenizer sees (line endings included).

use std::fs::File;
use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::get_typed_column_reader;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::errors::ParquetError;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::model::hub::{hub_file, HubError};

/// The dataset repository the original loaded with `load_dataset("wikitext", "wikitext-2-raw-v1")`.
pub const WIKITEXT_REPO: &str = "Salesforce/wikitext";
/// The test split of WikiText-2 raw inside [`WIKITEXT_REPO`].
pub const WIKITEXT_TEST_FILE: &str = "wikitext-2-raw-v1/test-00000-of-00001.parquet";
/// The parquet column holding one line of the article per row.
pub const WIKITEXT_COLUMN: &str = "text";
/// The original joined the dataset's rows with this before tokenizing.
pub const ROW_SEPARATOR: &str = "\n\n";

/// Where the evaluation text comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextSource {
    /// WikiText-2 raw test split from the hub (the default).
    WikiText2 { revision: String },
    /// A local file, used byte for byte.
    File(PathBuf),
}

impl Default for TextSource {
    fn default() -> Self {
        TextSource::WikiText2 {
            revision: "main".to_string(),
        }
    }
}

/// The text to score and a one-line description of where it came from, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalText {
    pub text: String,
    pub description: String,
}

/// Why the evaluation text could not be had.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read text file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("text file {} is not valid UTF-8 (first invalid byte at offset {offset})", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("cannot read parquet file {}: {source}", path.display())]
    Parquet { path: PathBuf, source: ParquetError },
    #[error("parquet file {} has no column named {column:?}", path.display())]
    MissingColumn { path: PathBuf, column: String },
    #[error("column {column:?} of {} holds {found}, not strings", path.display())]
    NotAStringColumn {
        path: PathBuf,
        column: String,
        found: String,
    },
    #[error("row {row} of column {column:?} in {} is null", path.display())]
    NullRow {
        path: PathBuf,
        column: String,
        row: usize,
    },
    #[error("row {row} of column {column:?} in {} is not valid UTF-8", path.display())]
    RowNotUtf8 {
        path: PathBuf,
        column: String,
        row: usize,
    },
}

/// Loads the evaluation text from `source`.
pub fn load_text(source: &TextSource, show_progress: bool) -> Result<EvalText, DataError> {
    match source {
        TextSource::File(path) => Ok(EvalText {
            text: read_text_file(path)?,
            description: format!("text file {}", path.display()),
        }),
        TextSource::WikiText2 { revision } => {
            let repo = Repo::with_revision(
                WIKITEXT_REPO.to_string(),
                RepoType::Dataset,
                revision.clone(),
            );
            let path = hub_file(&repo, WIKITEXT_TEST_FILE, show_progress)?;
            let rows = read_parquet_strings(&path, WIKITEXT_COLUMN)?;
            Ok(EvalText {
                text: rows.join(ROW_SEPARATOR),
                description: format!("WikiText-2 raw test ({WIKITEXT_REPO}, {} rows)", rows.len()),
            })
        }
    }
}

/// Reads a text file exactly as stored: no line-ending or BOM changes.
pub fn read_text_file(path: &Path) -> Result<String, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|error| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: error.utf8_error().valid_up_to(),
    })
}

/// All values of the string column `column` of a parquet file, in row order.
pub fn read_parquet_strings(path: &Path, column: &str) -> Result<Vec<String>, DataError> {
    let parquet_error = |source: ParquetError| DataError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(parquet_error)?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let column_index = schema
        .columns()
        .iter()
        .position(|descriptor| descriptor.name() == column)
        .ok_or_else(|| DataError::MissingColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
        })?;
    let descriptor = schema.column(column_index);
    if descriptor.physical_type() != PhysicalType::BYTE_ARRAY {
        return Err(DataError::NotAStringColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: descriptor.physical_type().to_string(),
        });
    }
    let max_definition_level = descriptor.max_def_level();

    let mut rows = Vec::new();
    for row_group in 0..reader.num_row_groups() {
        let row_group = reader.get_row_group(row_group).map_err(parquet_error)?;
        let mut column_reader = get_typed_column_reader::<ByteArrayType>(
            row_group
                .get_column_reader(column_index)
                .map_err(parquet_error)?,
        );
        loop {
            let mut definition_levels = Vec::new();
            let mut values: Vec<ByteArray> = Vec::new();
            let (records, _, _) = column_reader
                .read_records(1024, Some(&mut definition_levels), None, &mut values)
                .map_err(parquet_error)?;
            if records == 0 {
                break;
            }
            if max_definition_level > 0 {
                if let Some(null_at) = definition_levels
                    .iter()
                    .position(|&level| level < max_definition_level)
                {
                    return Err(DataError::NullRow {
                        path: path.to_path_buf(),
                        column: column.to_string(),
                        row: rows.len() + null_at,
                    });
                }
            }
            for value in values {
                let row = rows.len();
                let text = String::from_utf8(value.data().to_vec()).map_err(|_| {
                    DataError::RowNotUtf8 {
                        path: path.to_path_buf(),
                        column: column.to_string(),
                        row,
                    }
                })?;
                rows.push(text);
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    fn write_parquet(path: &Path, schema: &str, rows: &[&str]) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let properties = Arc::new(WriterProperties::builder().build());
        let mut writer =
            SerializedFileWriter::new(File::create(path).unwrap(), schema, properties).unwrap();
        let mut row_group = writer.next_row_group().unwrap();
        let mut column = row_group.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = rows.iter().map(|row| ByteArray::from(*row)).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .unwrap();
        column.close().unwrap();
        row_group.close().unwrap();
        writer.close().unwrap();
    }

    #[test]
    fn text_file_is_read_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crlf.txt");
        std::fs::write(&path, b"\xEF\xBB\xBFone\r\ntwo\n\n three\r").unwrap();
        assert_eq!(
            read_text_file(&path).unwrap(),
            "\u{feff}one\r\ntwo\n\n three\r"
        );
    }

    #[test]
    fn invalid_utf8_names_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latin1.txt");
        std::fs::write(&path, b"caf\xE9").unwrap();
        let error = read_text_file(&path).unwrap_err();
        assert!(
            matches!(error, DataError::NotUtf8 { offset: 3, .. }),
            "{error}"
        );
    }

    #[test]
    fn parquet_rows_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.parquet");
        let rows = ["", " = Robert Boulter = \n", "", " Héllo wörld \n"];
        write_parquet(
            &path,
            "message schema { REQUIRED BYTE_ARRAY text (UTF8); }",
            &rows,
        );
        assert_eq!(read_parquet_strings(&path, "text").unwrap(), rows);
        assert_eq!(
            read_parquet_strings(&path, "text")
                .unwrap()
                .join(ROW_SEPARATOR),
            "\n\n = Robert Boulter = \n\n\n\n\n Héllo wörld \n"
        );
    }

    #[test]
    fn missing_column_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.parquet");
        write_parquet(
            &path,
            "message schema { REQUIRED BYTE_ARRAY body (UTF8); }",
            &["a"],
        );
        let error = read_parquet_strings(&path, "text").unwrap_err();
        assert!(matches!(error, DataError::MissingColumn { .. }), "{error}");
    }

    #[test]
    fn a_non_parquet_file_is_a_parquet_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not.parquet");
        std::fs::write(&path, b"plain text, no magic").unwrap();
        let error = read_parquet_strings(&path, "text").unwrap_err();
        assert!(matches!(error, DataError::Parquet { .. }), "{error}");
    }
}

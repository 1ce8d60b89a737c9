//! The hub path for real: a local HTTP server serves the tiny model and a
//! tiny WikiText-2 parquet in the Hugging Face URL layout, with the headers
//! hf-hub 0.4's sync API reads (`ETag`, `X-Repo-Commit`, `Content-Range` on
//! ranged GETs). `HF_ENDPOINT` points there, so download, cache and progress
//! code all run; a second run with `HF_HUB_OFFLINE=1` must use the cache only.

mod common;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kv_validate::data::{ROW_SEPARATOR, WIKITEXT_REPO, WIKITEXT_TEST_FILE};
use kv_validate::model::tiny::TinyLlama;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use common::*;

const MODEL_REPO: &str = "tiny-org/tiny-llama";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves `files` (URL path -> bytes) until the test process ends; counts requests.
fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&requests);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            respond(stream, &files);
        }
    });
    (endpoint, requests)
}

/// One HTTP/1.1 exchange: honours `Range: bytes=a-b` / `bytes=a-` with 206.
fn respond(mut stream: TcpStream, files: &HashMap<String, Vec<u8>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").map(str::to_string);
            }
        }
    }
    let Some(body) = files.get(&path) else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    let etag = format!("{:016x}", hasher.finish());
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((start, end)) => {
            let start: usize = start.parse().unwrap();
            let end = if end.is_empty() {
                body.len() - 1
            } else {
                end.parse().unwrap()
            };
            (start, end.min(body.len() - 1))
        }
        None => (0, body.len() - 1),
    };
    let slice = &body[start..=end];
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{}\r\n\
         ETag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        slice.len(),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(slice);
}

/// The rows as a snappy-compressed parquet file with one `text` column, as the hub has it.
fn parquet_bytes(rows: &[&str], dir: &Path) -> Vec<u8> {
    let path = dir.join("test.parquet");
    let schema = Arc::new(
        parse_message_type("message schema { OPTIONAL BYTE_ARRAY text (UTF8); }").unwrap(),
    );
    let properties = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(&path).unwrap(), schema, properties)
            .unwrap();
    let mut row_group = writer.next_row_group().unwrap();
    let mut column = row_group.next_column().unwrap().unwrap();
    let values: Vec<ByteArray> = rows.iter().map(|row| ByteArray::from(*row)).collect();
    let definition_levels = vec![1i16; rows.len()];
    column
        .typed::<ByteArrayType>()
        .write_batch(&values, Some(&definition_levels), None)
        .unwrap();
    column.close().unwrap();
    row_group.close().unwrap();
    writer.close().unwrap();
    std::fs::read(path).unwrap()
}

/// Runs kv-validate against the hub at `endpoint`; `model` is `--model REPO` or `--model-dir DIR`.
fn run(
    endpoint: &str,
    hf_home: &Path,
    offline: bool,
    json: &Path,
    compressor: &Path,
    model: [&str; 2],
) -> std::process::Output {
    let args = [
        "--context",
        "32",
        "--targets",
        "16",
        "--max-windows",
        "2",
        "--json",
        json.to_str().unwrap(),
    ];
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kv-validate"));
    command
        .args(model)
        .args(args)
        .env("KV_COMPRESS_PATH", compressor)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN");
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    } else {
        command.env_remove("HF_HUB_OFFLINE");
    }
    command.output().unwrap()
}

#[test]
fn model_and_wikitext_download_from_the_hub_then_run_offline_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let prose = std::fs::read_to_string(prose_path()).unwrap();
    let rows: Vec<&str> = prose.split('\n').collect();

    let mut files = HashMap::new();
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        files.insert(
            format!("/{MODEL_REPO}/resolve/main/{file}"),
            std::fs::read(model.hf_dir.join(file)).unwrap(),
        );
    }
    files.insert(
        format!("/datasets/{WIKITEXT_REPO}/resolve/main/{WIKITEXT_TEST_FILE}"),
        parquet_bytes(&rows, dir.path()),
    );
    let (endpoint, requests) = serve(files);
    let compressor = identity_compressor(dir.path());
    let hf_home = dir.path().join("hf-home");
    let json = dir.path().join("online.json");

    let hub_model = ["--model", MODEL_REPO];
    let online = run(&endpoint, &hf_home, false, &json, &compressor, hub_model);
    let stderr = String::from_utf8_lossy(&online.stderr);
    assert_eq!(online.status.code(), Some(0), "{stderr}");
    assert!(
        requests.load(Ordering::SeqCst) >= 8,
        "2 requests per file (metadata, body)"
    );
    let report: serde_json::Value = read_json(&json);
    assert_eq!(
        report["data"],
        format!("WikiText-2 raw test ({WIKITEXT_REPO}, {} rows)", rows.len())
    );
    // The text scored is the rows joined as the original joined them.
    let tokenizer = TinyLlama::tokenizer().unwrap();
    let tokens = tokenizer
        .encode(rows.join(ROW_SEPARATOR), true)
        .unwrap()
        .len();
    let protocol = report["protocol"].as_str().unwrap();
    assert!(
        protocol.ends_with(&format!("over {tokens} tokens")),
        "{protocol} vs {tokens}"
    );
    assert!(hf_home.join("hub/models--tiny-org--tiny-llama").is_dir());
    assert!(hf_home.join("hub/datasets--Salesforce--wikitext").is_dir());

    // Offline, against a dead endpoint: the same figures, no request made.
    let served = requests.load(Ordering::SeqCst);
    let offline_json = dir.path().join("offline.json");
    let offline = run(
        "http://127.0.0.1:9",
        &hf_home,
        true,
        &offline_json,
        &compressor,
        hub_model,
    );
    assert_eq!(
        offline.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    assert_eq!(requests.load(Ordering::SeqCst), served);
    let offline_report: serde_json::Value = read_json(&offline_json);
    assert_eq!(offline_report["perplexity"], report["perplexity"]);

    // Offline with an empty cache: one clear error, exit 2.
    let empty_home = dir.path().join("empty-home");
    let model_dir = ["--model-dir", model.hf_dir.to_str().unwrap()];
    for (model, missing_file) in [(hub_model, "config.json"), (model_dir, WIKITEXT_TEST_FILE)] {
        let missing = run(
            &endpoint,
            &empty_home,
            true,
            &offline_json,
            &compressor,
            model,
        );
        let stderr = String::from_utf8_lossy(&missing.stderr);
        assert_eq!(missing.status.code(), Some(2), "{stderr}");
        let error = stderr.lines().last().unwrap_or_default();
        assert!(
            error.starts_with("error: ") && error.contains("HF_HUB_OFFLINE"),
            "{stderr}"
        );
        assert!(error.contains(missing_file), "{stderr}");
        // Model and data resolve the cache the same way: HF_HOME/hub.
        assert!(
            error.contains(&empty_home.join("hub").display().to_string()),
            "{stderr}"
        );
    }
    assert_eq!(requests.load(Ordering::SeqCst), served);
}

#[test]
fn capacity_fetches_the_config_alone_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // Only config.json is served: fetching weights or the tokenizer would fail.
    let config = std::fs::read(model.hf_dir.join("config.json")).unwrap();
    let files = HashMap::from([(format!("/{MODEL_REPO}/resolve/main/config.json"), config)]);
    let (endpoint, requests) = serve(files);
    let capacity = |args: &[&str], json: &Path| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kv-validate"))
            .arg("capacity")
            .args(args)
            .args(["--gpu-memory", "1GiB", "--json", json.to_str().unwrap()])
            .env("HF_ENDPOINT", &endpoint)
            .env("HF_HOME", dir.path().join("hf-home"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        read_json(json)
    };
    let from_hub: serde_json::Value =
        capacity(&["--model", MODEL_REPO], &dir.path().join("hub.json"));
    assert!(
        requests.load(Ordering::SeqCst) <= 2,
        "config.json's metadata and body only"
    );
    let from_dir: serde_json::Value = capacity(
        &["--model-dir", model.hf_dir.to_str().unwrap()],
        &dir.path().join("dir.json"),
    );
    assert_eq!(from_hub["rows"], from_dir["rows"]);
    assert_eq!(from_hub["model"], format!("{MODEL_REPO}@main"));
}

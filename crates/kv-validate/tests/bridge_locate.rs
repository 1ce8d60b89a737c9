//! Where `KvCompress::locate` looks, in the original bridge's order. This
//! binary holds one test because it changes the process's environment and
//! working directory.

mod common;

use kv_validate::bridge::{BridgeError, KvCompress};

use common::write_script;

#[test]
fn locate_follows_env_then_bin_then_path() {
    let dir = tempfile::tempdir().unwrap();
    let on_path = dir.path().join("path-dir");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&on_path).unwrap();
    std::fs::create_dir_all(work.join("bin")).unwrap();
    let path_binary = write_script(&on_path, "kv-compress", "#!/bin/sh\n");
    let explicit = write_script(dir.path(), "my-compressor", "#!/bin/sh\n");
    std::env::set_current_dir(&work).unwrap();
    std::env::set_var("PATH", &on_path);

    // KV_COMPRESS_PATH wins over everything, and must name a file.
    std::env::set_var("KV_COMPRESS_PATH", &explicit);
    assert_eq!(KvCompress::locate().unwrap().program(), explicit);
    std::env::set_var("KV_COMPRESS_PATH", dir.path().join("absent"));
    assert!(matches!(
        KvCompress::locate(),
        Err(BridgeError::EnvPathNotAFile { .. })
    ));
    std::env::remove_var("KV_COMPRESS_PATH");

    // Nothing beside this test binary (target/*/deps), so PATH is next...
    assert_eq!(KvCompress::locate().unwrap().program(), path_binary);
    // ...unless bin/kv-compress exists under the working directory.
    write_script(&work.join("bin"), "kv-compress", "#!/bin/sh\n");
    assert_eq!(
        KvCompress::locate().unwrap().program(),
        std::path::Path::new("bin/kv-compress")
    );

    std::fs::remove_file(work.join("bin/kv-compress")).unwrap();
    std::env::set_var("PATH", "");
    let error = KvCompress::locate().unwrap_err();
    assert!(matches!(error, BridgeError::NotFound { .. }));
    assert!(
        error
            .to_string()
            .contains("cargo install --path crates/kv-compress"),
        "{error}"
    );
}

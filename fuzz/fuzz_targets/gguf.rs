//! The GGUF reader on arbitrary files: header, metadata, tensor table, offsets,
//! alignment, dims. A file that opens has every tensor's bytes inside it (read both ways
//! and compared), its metadata read as the model needs it, its tokenizer built from its
//! vocabulary and its chat template (the file's own Jinja text) compiled and rendered.
//! Run with `-rss_limit_mb` so that an allocation a header asks for is a finding.
#![no_main]

use duet::model::template::{ChatTemplate, Message};
use duet::model::tokenizer::TextCodec;
use duet::model::weights::WeightSource;
use duet::model::GgufFile;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The file each input is written to (one per process; the reader takes a path).
fn scratch() -> &'static PathBuf {
    static P: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &P.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("input.gguf");
        (dir, path)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write the input");
    let Ok(file) = GgufFile::open(path) else {
        return;
    };
    let mut names: Vec<&String> = file.content.tensor_infos.keys().collect();
    names.sort();
    for name in names.into_iter().take(64) {
        let (dtype, dims) = file.describe(name).expect("a listed tensor");
        let size = duet::model::weights::byte_size(dtype, &dims);
        assert!(size as u64 <= data.len() as u64, "{name}: {size} bytes");
        let mut read = vec![0u8; size];
        file.read_raw(name, &mut read)
            .expect("a checked tensor reads");
        let parts = file.parts(name).expect("a checked tensor maps");
        let mapped: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert!(
            mapped == read,
            "{name}: the mapped bytes differ from the read ones"
        );
    }
    let Ok(info) = file.info() else {
        return;
    };
    assert!(info.parameter_count <= 2 * data.len() as u64 * 8);
    if let Some(source) = info.chat_template.as_deref() {
        if let Ok(t) = ChatTemplate::new(source) {
            let _ = t.render(&[Message::new("user", "hi")], true);
        }
    }
    if let Ok(codec) = TextCodec::load(&file) {
        if let Ok(ids) = codec.encode("def f(x):\n    return x <|im_end|>") {
            let _ = codec.decode(&ids);
        }
    }
});

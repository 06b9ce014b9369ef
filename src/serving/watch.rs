//! Notices a model's weights file changing on disk while the server runs, and decides
//! what the model becomes:
//! - the file is **cut short or corrupt** (its header or tensor table no longer read,
//!   or an hf-hub blob's bytes no longer match the sha256 it is named by): the model is
//!   unavailable with that reason, and the router falls back;
//! - the file was **replaced** by a good one (a new inode, as downloads do): the model
//!   reloads from it at its next request; requests running finish on the old file;
//! - the file was **rewritten in place** with something readable: requests running on
//!   it fail (their weights changed under them) and the model reloads; a blob whose
//!   bytes still match its name (a `touch`) changes nothing;
//! - the file **disappeared**: nothing yet (the mapped model keeps serving); what
//!   appears in its place later is judged as above.
//!
//! A read past the end of a file cut short between two looks is caught when it happens
//! ([`super::mapping`]).

use super::worker::{FileStamp, ModelSlot, SlotFile};
use crate::model::GgufFile;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How often the files are looked at (a `stat` each).
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Starts the thread that watches `slots`' files.
pub fn spawn(slots: Vec<Arc<ModelSlot>>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("duet-watch".into())
        .spawn(move || {
            let mut last: HashMap<String, Option<FileStamp>> = HashMap::new();
            loop {
                std::thread::sleep(every);
                for slot in &slots {
                    look(slot, &mut last);
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the model files: changes on disk go unnoticed");
    }
}

/// One look at a slot's file; `last` holds the stamp each was last judged at.
fn look(slot: &ModelSlot, last: &mut HashMap<String, Option<FileStamp>>) {
    let Some(file) = slot.file() else {
        last.remove(&slot.name);
        return;
    };
    let now = FileStamp::of(&file.path);
    let before = *last.entry(slot.name.clone()).or_insert(file.stamp);
    if now == before {
        return;
    }
    last.insert(slot.name.clone(), now);
    // The file the slot was just given (`duet pull`), unless it was judged bad since.
    if now == file.stamp && slot.failure().is_none() {
        return;
    }
    let Some(stamp) = now else {
        tracing::warn!(model = %slot.name, path = %file.path.display(), "weights file removed: the loaded model keeps serving");
        return;
    };
    let in_place = file.stamp.is_some_and(|s| s.same_inode(&stamp));
    match judge(&file.path) {
        Ok((_, Verified::Matches)) if in_place && slot.failure().is_none() => {
            tracing::info!(model = %slot.name, "weights file touched; its bytes still match its sha256");
        }
        Ok((new, _)) => slot.file_changed(Ok(new), in_place),
        Err(why) => slot.file_changed(Err(why), in_place),
    }
}

/// Whether a file's bytes were checked against the sha256 it is named by.
#[derive(Debug, PartialEq)]
pub enum Verified {
    Matches,
    /// Not an hf-hub blob: nothing to check against.
    Unknown,
}

/// Reads a changed file's header and tensor table (and, for an hf-hub blob, its
/// sha256): the file to load from, or why it cannot be used.
pub fn judge(path: &Path) -> Result<(SlotFile, Verified), String> {
    let info = GgufFile::open(path)
        .and_then(|g| g.info())
        .map_err(|e| format!("its weights file changed on disk and cannot be used: {e}"))?;
    let stamp_before = FileStamp::of(path);
    let verified = match blob_sha256(path) {
        Some(expected) => {
            let got = sha256_of(path)
                .map_err(|e| format!("its weights file changed on disk and cannot be read: {e}"))?;
            if got != expected {
                return Err(format!(
                    "its weights file {} changed on disk and no longer matches its sha256 {expected} (corrupt): fetch it again with `duet pull`",
                    path.display()
                ));
            }
            Verified::Matches
        }
        None => Verified::Unknown,
    };
    let mut file = SlotFile::new(path.to_path_buf(), info);
    // What was checked is what the stamp names (a change meanwhile is judged next time).
    file.stamp = stamp_before;
    Ok((file, verified))
}

/// The sha256 an hf-hub blob is named by (the cache names each blob by its hash).
pub fn blob_sha256(path: &Path) -> Option<String> {
    let real = std::fs::canonicalize(path).ok()?;
    let name = real.file_name()?.to_str()?;
    let in_blobs = real.parent()?.file_name()? == "blobs";
    (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| name.to_ascii_lowercase())
}

/// The sha256 of a file, hex.
pub fn sha256_of(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_known_by_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        let data = b"hello\n";
        let sha = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        std::fs::write(blobs.join(sha), data).unwrap();
        // A snapshot's link leads to the blob, as in the hf-hub cache.
        let link = dir.path().join("model.gguf");
        std::os::unix::fs::symlink(blobs.join(sha), &link).unwrap();
        assert_eq!(blob_sha256(&link).as_deref(), Some(sha));
        assert_eq!(sha256_of(&link).unwrap(), sha);
        // A file elsewhere, or not named by a hash, has nothing to check against.
        let plain = dir.path().join(sha);
        std::fs::write(&plain, data).unwrap();
        assert_eq!(blob_sha256(&plain), None);
        std::fs::write(blobs.join("notahash"), data).unwrap();
        assert_eq!(blob_sha256(&blobs.join("notahash")), None);
    }

    #[test]
    fn a_file_that_does_not_read_is_judged_unusable_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"this is not a model").unwrap();
        let why = judge(&junk).err().unwrap();
        assert!(
            why.contains("cannot be used") && why.contains("junk.gguf"),
            "{why}"
        );
    }
}

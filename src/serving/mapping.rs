//! Surviving a model file that is cut short while it is served.
//!
//! Weights are read from the GGUF file mapped into memory. When the file is truncated
//! (a download restarted over it, a disk filling up, `truncate`), reading a page past
//! its new end raises SIGBUS, which kills the process: Ollama survives that only
//! because its model runs in a separate process. Here each loaded model's mapped ranges
//! are registered ([`MappedFile`]); a SIGBUS handler that finds the faulting address in
//! one of them maps zero pages over the rest of that range (so the read completes,
//! with zeros) and marks it faulted. The worker checks the mark after every forward
//! pass and, when set, fails that pass's requests and the model with the reason,
//! instead of handing anyone the zeros' output. A fault anywhere else is left to the
//! previous disposition (the process dies, as it would have).
//!
//! The handler only reads atomics and calls `mmap`, a raw system call on Linux.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

/// Registered ranges at once (each loaded model has one or a few).
const SLOTS: usize = 64;

struct Range {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Range = Range {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static RANGES: [Range; SLOTS] = [EMPTY; SLOTS];
/// Serialises registration (the handler itself takes no lock).
static REGISTER: Mutex<()> = Mutex::new(());
static INSTALL: Once = Once::new();
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS disposition before ours, restored for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The ranges of one file mapped into this process, watched for faults while this
/// lives. It holds what keeps the mapping alive (`keep`), so the ranges are never
/// registered after they are unmapped.
pub struct MappedFile<T> {
    slots: Vec<usize>,
    keep: Arc<T>,
}

impl<T> MappedFile<T> {
    /// Registers every range of this process that maps `path` (found in
    /// /proc/self/maps by the file's device and inode), kept alive by `keep`. `None`
    /// when the file is not mapped or /proc cannot be read (nothing to watch).
    pub fn register(path: &std::path::Path, keep: Arc<T>) -> Option<Self> {
        let ranges = ranges_of(path)?;
        install();
        let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        let mut slots = Vec::new();
        for (start, end) in ranges {
            let Some(i) = RANGES
                .iter()
                .position(|r| r.end.load(Ordering::Acquire) == 0)
            else {
                tracing::warn!("too many mapped model files to watch for truncation");
                break;
            };
            let r = &RANGES[i];
            r.faulted.store(false, Ordering::Release);
            r.start.store(start, Ordering::Release);
            r.end.store(end, Ordering::Release);
            slots.push(i);
        }
        (!slots.is_empty()).then_some(Self { slots, keep })
    }

    /// Whether a read past the file's end has been caught in one of its ranges.
    pub fn faulted(&self) -> bool {
        self.slots
            .iter()
            .any(|&i| RANGES[i].faulted.load(Ordering::Acquire))
    }

    /// What keeps the mapping alive.
    pub fn kept(&self) -> &Arc<T> {
        &self.keep
    }
}

impl<T> Drop for MappedFile<T> {
    fn drop(&mut self) {
        let _lock = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
        for &i in &self.slots {
            RANGES[i].end.store(0, Ordering::Release);
            RANGES[i].start.store(0, Ordering::Release);
        }
        // `keep` drops after this: the ranges are gone before they can be unmapped.
    }
}

/// The address ranges mapping `path`, from /proc/self/maps.
fn ranges_of(path: &std::path::Path) -> Option<Vec<(usize, usize)>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let ranges: Vec<(usize, usize)> = maps
        .lines()
        .filter_map(|line| {
            // start-end perms offset major:minor inode path
            let mut f = line.split_ascii_whitespace();
            let (range, _, _, devs, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            if inode.parse::<u64>().ok()? != ino {
                return None;
            }
            let (major, minor) = devs.split_once(':')?;
            let (major, minor) = (
                u32::from_str_radix(major, 16).ok()?,
                u32::from_str_radix(minor, 16).ok()?,
            );
            if libc::makedev(major, minor) != dev {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some((
                usize::from_str_radix(s, 16).ok()?,
                usize::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect();
    (!ranges.is_empty()).then_some(ranges)
}

fn install() {
    INSTALL.call_once(|| unsafe {
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        // The current disposition is kept first, so the handler always finds it.
        let mut previous: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous);
        let _ = PREVIOUS.set(previous);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            tracing::warn!("cannot install the SIGBUS handler: a model file cut short while served will stop the server");
        }
    });
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for r in &RANGES {
        let (start, end) = (
            r.start.load(Ordering::Acquire),
            r.end.load(Ordering::Acquire),
        );
        if start <= addr && addr < end {
            let from = addr & !(page - 1);
            // SAFETY: the range is a read-only file mapping this process owns; zero
            // pages replace the part past the file's end, where reads fault.
            let p = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    end - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                r.faulted.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours (or the zero pages could not be mapped): the previous disposition, which
    // the same fault meets again when this returns.
    // SAFETY: restoring a disposition read from the kernel (or the default).
    unsafe {
        match PREVIOUS.get() {
            Some(p) => libc::sigaction(libc::SIGBUS, p, std::ptr::null_mut()),
            None => {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
                0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_read_past_a_truncated_files_end_is_caught_and_reads_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test owns the file; reading it after truncation is the point.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let guard = MappedFile::register(&path, map.clone()).expect("the mapping is found");
        assert_eq!(map[(1 << 20) - 1], 7);
        assert!(!guard.faulted());
        // Cut the file to one page: reading its old end faults; the handler answers.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let byte = unsafe { std::ptr::read_volatile(&map[(1 << 20) - 1]) };
        assert_eq!(byte, 0);
        assert!(guard.faulted());
        assert_eq!(map[0], 7, "the pages before the end still hold the file");
        drop(guard);
        let at = map.as_ptr() as usize;
        assert!(!RANGES.iter().any(|r| r.start.load(Ordering::Acquire) == at));
    }

    #[test]
    fn files_that_are_not_mapped_are_not_registered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.bin");
        std::fs::write(&path, b"not mapped").unwrap();
        assert!(MappedFile::register(&path, Arc::new(())).is_none());
    }
}

//! Crafted GGUF files: every class of header that overflowed GGUF parsers elsewhere
//! (CVE-2024-25664..25668, CVE-2024-21802/21836/23496/23605, CVE-2024-39720,
//! CVE-2025-0317, llama.cpp's oss-fuzz findings) gives a typed error from
//! `GgufFile::open`: no panic, and nothing allocated beyond the file's own size (a
//! counting allocator in this test binary measures what each open allocates).

use duet::model::{GgufError, GgufFile};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

/// Counts the bytes allocated by each thread, now and at most, so that tests running in
/// parallel do not see each other's allocations.
struct Counting;

thread_local! {
    static NOW: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn add(n: isize) {
    let _ = NOW.try_with(|now| {
        let v = now.get() + n;
        now.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            add(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            add(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        add(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            add(new as isize - l.size() as isize);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most a call of `f` allocated on this thread at once, beyond what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = NOW.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get) - base;
    (out, peak.max(0) as usize)
}

/// What opening a file may allocate whatever its size: the header of a small file (the
/// parser's budget is 64 KiB at least), the read buffer, the path, error messages.
const FIXED_OVERHEAD: usize = 128 << 10;

/// Opens `bytes` as a GGUF file, checking that it allocated no more than the file's
/// size (plus the fixed overhead).
fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crafted.gguf");
    std::fs::write(&path, bytes).unwrap();
    open_path(&path)
}

fn open_path(path: &Path) -> Result<GgufFile, GgufError> {
    let size = std::fs::metadata(path).unwrap().len() as usize;
    let (result, peak) = peak_of(|| GgufFile::open(path));
    assert!(
        peak <= size + FIXED_OVERHEAD,
        "opening a {size}-byte file allocated {peak} bytes at once: {:?}",
        result.as_ref().err()
    );
    result
}

/// Opens crafted bytes that must be refused as corrupt; returns the message.
#[track_caller]
fn corrupt(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Err(GgufError::Corrupt { message, .. }) => message,
        Err(e) => panic!("expected a corrupt-file error, got: {e}"),
        Ok(_) => panic!("a crafted file was accepted"),
    }
}

// ---- A GGUF writer that writes whatever it is told, counts and lengths included. ----

const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U8: u32 = 0;
const U32: u32 = 4;
const F32_TYPE: u32 = 0; // ggml type of f32 tensors
const Q8_0_TYPE: u32 = 8;

#[derive(Clone)]
struct Tensor {
    name: Vec<u8>,
    /// As written: innermost first (GGUF order).
    dims: Vec<u64>,
    n_dims: Option<u32>,
    dtype: u32,
    offset: u64,
}

#[derive(Clone)]
struct Crafted {
    version: u32,
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<Tensor>,
    alignment: usize,
    data: Vec<u8>,
}

fn string(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s);
    b
}

/// A key-value pair: key, value type, raw value bytes.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = string(key.as_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(value);
    b
}

fn kv_u32(key: &str, v: u32) -> Vec<u8> {
    kv(key, U32, &v.to_le_bytes())
}

fn kv_str(key: &str, v: &str) -> Vec<u8> {
    kv(key, STRING, &string(v.as_bytes()))
}

/// An array value: element type, length as written, the elements' bytes.
fn array(elem: u32, len: u64, body: &[u8]) -> Vec<u8> {
    let mut b = elem.to_le_bytes().to_vec();
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(body);
    b
}

fn f32_tensor(name: &str, dims: &[u64], offset: u64) -> Tensor {
    Tensor {
        name: name.as_bytes().to_vec(),
        dims: dims.to_vec(),
        n_dims: None,
        dtype: F32_TYPE,
        offset,
    }
}

impl Crafted {
    /// A small file duet opens and reads: Qwen2 metadata, a two-token vocabulary and
    /// three f32 tensors of 4x2, 4 and 4 values (80 bytes, the last byte of the file is
    /// the last tensor's).
    fn valid() -> Self {
        let tokens: Vec<u8> = [b"a".as_slice(), b"<|im_end|>"]
            .iter()
            .flat_map(|t| string(t))
            .collect();
        let merges: Vec<u8> = string(b"a a");
        Crafted {
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs: vec![
                kv_str("general.architecture", "qwen2"),
                kv_u32("qwen2.embedding_length", 4),
                kv_u32("qwen2.attention.head_count", 2),
                kv_u32("qwen2.attention.head_count_kv", 1),
                kv_u32("qwen2.context_length", 64),
                kv_u32("qwen2.block_count", 1),
                kv_u32("qwen2.feed_forward_length", 8),
                kv_str("tokenizer.ggml.model", "gpt2"),
                kv("tokenizer.ggml.tokens", ARRAY, &array(STRING, 2, &tokens)),
                kv("tokenizer.ggml.merges", ARRAY, &array(STRING, 1, &merges)),
                kv_u32("tokenizer.ggml.eos_token_id", 1),
                kv_u32("general.alignment", 32),
            ],
            tensors: vec![
                f32_tensor("token_embd.weight", &[4, 2], 0),
                f32_tensor("output_norm.weight", &[4], 32),
                f32_tensor("blk.0.attn_norm.weight", &[4], 64),
            ],
            alignment: 32,
            data: vec![0u8; 80],
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&self.version.to_le_bytes());
        let n_t = self.tensor_count.unwrap_or(self.tensors.len() as u64);
        let n_kv = self.kv_count.unwrap_or(self.kvs.len() as u64);
        b.extend_from_slice(&n_t.to_le_bytes());
        b.extend_from_slice(&n_kv.to_le_bytes());
        for kv in &self.kvs {
            b.extend_from_slice(kv);
        }
        for t in &self.tensors {
            b.extend_from_slice(&string(&t.name));
            let n = t.n_dims.unwrap_or(t.dims.len() as u32);
            b.extend_from_slice(&n.to_le_bytes());
            for d in &t.dims {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.extend_from_slice(&t.dtype.to_le_bytes());
            b.extend_from_slice(&t.offset.to_le_bytes());
        }
        while !b.len().is_multiple_of(self.alignment) {
            b.push(0);
        }
        b.extend_from_slice(&self.data);
        b
    }

    fn with_kv(mut self, kv: Vec<u8>) -> Self {
        self.kvs.push(kv);
        self
    }

    fn set_alignment(mut self, kv: Vec<u8>) -> Self {
        self.kvs
            .retain(|k| !k.windows(17).any(|w| w == b"general.alignment"));
        self.kvs.push(kv);
        self
    }
}

#[test]
fn the_valid_base_file_opens() {
    let f = open_bytes(&Crafted::valid().bytes()).expect("the base file opens");
    let info = f.info().expect("its metadata reads");
    assert_eq!((info.vocab_size, info.embedding_length), (2, 4));
    assert_eq!(info.parameter_count, 16);
}

#[test]
fn huge_tensor_and_key_counts() {
    for n in [1u64 << 20, 1 << 31, 1 << 40, 1 << 62, u64::MAX] {
        let mut c = Crafted::valid();
        c.tensor_count = Some(n);
        let m = corrupt(&c.bytes());
        assert!(m.contains(&format!("{n} tensors")), "{m}");
        let mut c = Crafted::valid();
        c.kv_count = Some(n);
        let m = corrupt(&c.bytes());
        assert!(m.contains(&format!("{n} metadata keys")), "{m}");
    }
    // One more than there are: the file ends inside what it claims.
    let mut c = Crafted::valid();
    c.kv_count = Some(c.kvs.len() as u64 + 1);
    corrupt(&c.bytes());
}

#[test]
fn huge_string_lengths() {
    for n in [1u64 << 20, 1 << 32, 1 << 62, u64::MAX] {
        // A key's length.
        let mut key = n.to_le_bytes().to_vec();
        key.extend_from_slice(b"general.name");
        let c = Crafted::valid().with_kv(key);
        let m = corrupt(&c.bytes());
        assert!(m.contains("past the end"), "{m}");
        // A string value's length.
        let mut value = n.to_le_bytes().to_vec();
        value.extend_from_slice(b"x");
        let c = Crafted::valid().with_kv(kv("general.name", STRING, &value));
        let m = corrupt(&c.bytes());
        assert!(m.contains("past the end"), "{m}");
        // A tensor name's length.
        let mut c = Crafted::valid();
        c.tensors[0].name = b"token_embd.weight".to_vec();
        let mut bytes = c.bytes();
        let at = find(&bytes, b"token_embd.weight") - 8;
        bytes[at..at + 8].copy_from_slice(&n.to_le_bytes());
        corrupt(&bytes);
    }
}

#[test]
fn huge_array_lengths() {
    for n in [1u64 << 20, 1 << 30, 1 << 31, 1 << 62, u64::MAX] {
        for elem in [U8, U32, 10 /* u64 */, STRING, ARRAY] {
            let mut body = vec![0u8; 64];
            if elem == ARRAY {
                body[..4].copy_from_slice(&U8.to_le_bytes());
            }
            let c = Crafted::valid().with_kv(kv("x.array", ARRAY, &array(elem, n, &body)));
            let m = corrupt(&c.bytes());
            assert!(
                m.contains("past the end") || m.contains("memory"),
                "{elem} x {n}: {m}"
            );
        }
    }
}

#[test]
fn arrays_nested_without_end() {
    // 10 000 arrays each holding the next: 120 kB of file, 10 000 frames of recursion
    // for a naive parser.
    let depth = 10_000;
    let mut body = Vec::new();
    for _ in 0..depth {
        body.extend_from_slice(&ARRAY.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
    }
    body.extend_from_slice(&U8.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    let c = Crafted::valid().with_kv(kv("x.nest", ARRAY, &body));
    let m = corrupt(&c.bytes());
    assert!(m.contains("nest"), "{m}");
}

#[test]
fn many_small_values_that_would_blow_up_in_memory() {
    // 200 000 one-byte values fit in the file, but parsed they take 32 bytes each.
    let n = 200_000u64;
    let c = Crafted::valid().with_kv(kv("x.bytes", ARRAY, &array(U8, n, &vec![7u8; n as usize])));
    let m = corrupt(&c.bytes());
    assert!(m.contains("memory"), "{m}");
    // So do 100 000 empty strings.
    let n = 100_000u64;
    let c = Crafted::valid().with_kv(kv(
        "x.strings",
        ARRAY,
        &array(STRING, n, &vec![0u8; 8 * n as usize]),
    ));
    let m = corrupt(&c.bytes());
    assert!(m.contains("memory"), "{m}");
}

#[test]
fn dims_whose_product_overflows() {
    for dims in [
        vec![1u64 << 32, 1 << 32, 1 << 32],
        vec![u64::MAX, 2],
        vec![1 << 62, 4],
        vec![3, 5, 7, u64::MAX / 64],
        // Fits as a count of values but not of bytes (f32: 4 bytes each).
        vec![1 << 62],
        vec![1 << 31, 1 << 31],
    ] {
        let mut c = Crafted::valid();
        c.tensors[1].dims = dims.clone();
        let m = corrupt(&c.bytes());
        assert!(m.contains("absurd shape"), "{dims:?}: {m}");
    }
    // Large but computable: the file is too short for it.
    let mut c = Crafted::valid();
    c.tensors[1].dims = vec![1 << 40];
    assert!(matches!(
        open_bytes(&c.bytes()),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn offsets_past_the_end_or_overlapping() {
    for offset in [96u64, 1 << 40, u64::MAX - 31] {
        let mut c = Crafted::valid();
        c.tensors[2].offset = offset;
        match open_bytes(&c.bytes()) {
            Err(GgufError::Truncated { tensor, .. }) => {
                assert_eq!(tensor, "blk.0.attn_norm.weight")
            }
            Err(GgufError::Corrupt { message, .. }) => {
                assert!(message.contains("absurd offset"), "{message}")
            }
            other => panic!("offset {offset}: {:?}", other.err()),
        }
    }
    // The second tensor starts inside the first (which has 32 bytes).
    let mut c = Crafted::valid();
    c.tensors[1].offset = 0;
    let m = corrupt(&c.bytes());
    assert!(m.contains("overlap"), "{m}");
    // Two names for the same bytes.
    let mut c = Crafted::valid();
    c.tensors[2].offset = 32;
    let m = corrupt(&c.bytes());
    assert!(m.contains("overlap"), "{m}");
}

#[test]
fn bad_alignment() {
    for (value, ty) in [
        (0u64.to_le_bytes()[..4].to_vec(), U32),
        (3u32.to_le_bytes().to_vec(), U32),
        (48u32.to_le_bytes().to_vec(), U32),
        (u32::MAX.to_le_bytes().to_vec(), U32),
        (0u8.to_le_bytes().to_vec(), U8),
        ((-32i32).to_le_bytes().to_vec(), 5),
        (string(b"32"), STRING),
        (32f32.to_le_bytes().to_vec(), 6),
    ] {
        let c = Crafted::valid().set_alignment(kv("general.alignment", ty, &value));
        let m = corrupt(&c.bytes());
        assert!(m.contains("general.alignment"), "{ty} {value:?}: {m}");
    }
    // A tensor that starts off the alignment.
    let mut c = Crafted::valid();
    c.tensors[2].offset = 68;
    let m = corrupt(&c.bytes());
    assert!(m.contains("not a multiple of the alignment"), "{m}");
    // A large power of two is a valid alignment: the data moves, nothing breaks.
    let mut c = Crafted::valid().set_alignment(kv_u32("general.alignment", 1 << 12));
    c.alignment = 1 << 12;
    for t in &mut c.tensors {
        t.offset <<= 7;
    }
    c.data = vec![0u8; 3 << 12];
    open_bytes(&c.bytes()).expect("alignment 4096");
}

#[test]
fn unknown_types() {
    for ty in [13u32, 100, u32::MAX] {
        let c = Crafted::valid().with_kv(kv("x.unknown", ty, &[0u8; 16]));
        let m = corrupt(&c.bytes());
        assert!(m.contains("type"), "{ty}: {m}");
        // As an array's element type.
        let c = Crafted::valid().with_kv(kv("x.unknown", ARRAY, &array(ty, 1, &[0u8; 16])));
        corrupt(&c.bytes());
    }
    // A tensor of a ggml type that does not exist.
    for dtype in [4u32, 99, u32::MAX] {
        let mut c = Crafted::valid();
        c.tensors[0].dtype = dtype;
        corrupt(&c.bytes());
    }
    // A bool that is neither 0 nor 1.
    let c = Crafted::valid().with_kv(kv("x.bool", 7, &[2]));
    corrupt(&c.bytes());
}

#[test]
fn too_many_dimensions() {
    for n in [5u32, 64, 1 << 20, u32::MAX] {
        let mut c = Crafted::valid();
        c.tensors[1].n_dims = Some(n);
        c.tensors[1].dims = vec![1; (n as usize).min(64)];
        corrupt(&c.bytes());
    }
}

#[test]
fn repeated_names() {
    let mut c = Crafted::valid();
    c.tensors[2].name = b"output_norm.weight".to_vec();
    let m = corrupt(&c.bytes());
    assert!(m.contains("tensor name is repeated"), "{m}");
    let c = Crafted::valid().with_kv(kv_u32("qwen2.block_count", 100));
    let m = corrupt(&c.bytes());
    assert!(m.contains("key is repeated"), "{m}");
}

#[test]
fn bad_magic_and_versions() {
    let good = Crafted::valid().bytes();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    corrupt(&b);
    for v in [0u32, 4, u32::MAX] {
        let mut c = Crafted::valid();
        c.version = v;
        corrupt(&c.bytes());
    }
    corrupt(b"");
    corrupt(b"GGUF");
}

#[test]
fn truncated_anywhere() {
    let good = Crafted::valid().bytes();
    let header_end = good.len() - 80;
    for cut in 0..good.len() {
        match open_bytes(&good[..cut]) {
            Err(GgufError::Corrupt { .. }) => assert!(cut < header_end, "cut at {cut}"),
            Err(GgufError::Truncated { .. }) => {}
            Err(e) => panic!("cut at {cut}: {e}"),
            Ok(_) => panic!("a file cut at byte {cut} of {} opened", good.len()),
        }
    }
}

#[test]
fn a_token_table_that_is_not_a_matrix() {
    for dims in [vec![], vec![8u64], vec![2, 2, 2]] {
        let mut c = Crafted::valid();
        c.tensors[0].dims = dims.clone();
        let f = open_bytes(&c.bytes()).expect("the file itself is sound");
        match f.info() {
            Err(GgufError::Unsupported { message, .. }) => {
                assert!(message.contains("token_embd.weight"), "{message}")
            }
            other => panic!("{dims:?}: {:?}", other.err()),
        }
    }
}

#[test]
fn a_quantized_tensor_of_a_partial_block() {
    // Q8_0 packs 32 values per block: 40 values are not a whole number of blocks.
    let mut c = Crafted::valid();
    c.tensors[1].dtype = Q8_0_TYPE;
    c.tensors[1].dims = vec![40];
    let m = corrupt(&c.bytes());
    assert!(m.contains("block size"), "{m}");
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle")
}

mod common;

mod real {
    //! The real models' files, cut short and with their header bytes changed.
    use super::*;

    fn real_header(name: &str, len: usize) -> Vec<u8> {
        use std::io::Read;
        let mut f = std::fs::File::open(common::weights(name)).unwrap();
        let mut b = vec![0u8; len];
        f.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn the_real_files_open_and_their_metadata_fits_the_budget() {
        for name in [common::SMALL, common::LARGE] {
            let f = open_path(&common::weights(name)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(f.info().unwrap().architecture, "qwen2");
        }
    }

    #[test]
    fn a_real_file_cut_short_is_refused() {
        // Inside the header (the vocabulary is in the first 6 MB), at its end (what the
        // header builds would then take more memory than the file holds, and its tensors
        // lie past the end: a download cut short), and 64 MiB into the tensor data.
        let full = real_header(common::SMALL, 64 << 20);
        let data_start = {
            let f = GgufFile::open(&common::weights(common::SMALL)).unwrap();
            f.content.tensor_data_offset as usize
        };
        for cut in [0, 24, 1000, 100_000, 1 << 20, 3 << 20] {
            let m = corrupt(&full[..cut]);
            assert!(!m.is_empty());
        }
        // Cut where the data starts: the tensors it declares lie past the end.
        assert!(matches!(
            open_bytes(&full[..data_start]),
            Err(GgufError::Truncated { have, needed, .. })
                if have == data_start as u64 && needed > have
        ));
        assert!(matches!(
            open_bytes(&full),
            Err(GgufError::Truncated { have, .. }) if have == 64 << 20
        ));
    }

    /// A file's chat template runs on every request: its work is bounded in proportion
    /// to the conversation (duet::model::template), and the bounds leave the real
    /// templates room for long conversations with tools and calls.
    #[test]
    fn the_real_chat_templates_render_long_conversations() {
        use duet::model::template::{ChatTemplate, Message};
        use serde_json::json;
        let tools: Vec<serde_json::Value> = (0..32)
            .map(|i| {
                json!({"type": "function", "function": {"name": format!("f{i}"),
                "description": "d", "parameters": {"type": "object",
                "properties": {"a": {"type": "string"}}}}})
            })
            .collect();
        let messages: Vec<Message> = (0..20_000)
            .map(|i| {
                let mut m = Message::new(["user", "assistant", "tool"][i % 3], "hello");
                if i % 3 == 1 {
                    m.tool_calls = Some(vec![
                        json!({"function": {"name": "f1", "arguments": {"a": "x"}}});
                        3
                    ]);
                }
                m
            })
            .collect();
        for name in [common::SMALL, common::LARGE] {
            let f = GgufFile::open(&common::weights(name)).unwrap();
            let source = f.info().unwrap().chat_template.unwrap();
            let t = ChatTemplate::new(&source).unwrap();
            let text = t
                .render_with_tools(&messages, Some(&tools), true)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.matches("<tool_call>").count() >= 3 * 6_667, "{name}");
        }
    }

    #[test]
    fn a_real_header_with_a_crafted_count() {
        let full = real_header(common::SMALL, 64 << 20);
        // The tensor count (bytes 8..16) and key count (16..24) of a real header.
        for (at, n) in [(8, 1u64 << 40), (16, 1 << 40), (8, u64::MAX), (16, 1 << 29)] {
            let mut b = full.clone();
            b[at..at + 8].copy_from_slice(&n.to_le_bytes());
            corrupt(&b);
        }
        // The vocabulary's length (the first array of strings after its key).
        let at = find(&full, b"tokenizer.ggml.tokens") + "tokenizer.ggml.tokens".len() + 4;
        let mut b = full.clone();
        b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        corrupt(&b);
    }
}

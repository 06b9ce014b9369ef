//! Opening a GGUF file: parse the header, check that every tensor lies inside the file
//! (so a truncated download is reported up front, not as an I/O error mid-load), and
//! read the metadata `duet show` and the model need.

use super::weights::{byte_size, read_owned, TensorBytes, WeightSource};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::GgmlDType;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("model file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file (corrupt or not GGUF): {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} is truncated: tensor '{tensor}' ends at byte {needed} but the file has {have} bytes \
         (an interrupted download? fetch it again)"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        needed: u64,
        have: u64,
    },
    #[error("{path}: unsupported model: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// What a GGUF file says about the model in it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub file_size: u64,
    pub architecture: String,
    pub name: Option<String>,
    /// `general.basename` ("Qwen2.5-Coder").
    pub basename: Option<String>,
    /// Whether the vocabulary has the fill-in-the-middle tokens (`<|fim_prefix|>`,
    /// `<|fim_suffix|>`, `<|fim_middle|>`): Ollama's "insert" capability.
    pub fill_in_middle: bool,
    /// Elements of every tensor (an untied output projection counts, as in llama.cpp).
    pub parameter_count: u64,
    /// `general.size_label`, the publisher's rounded size ("1.5B").
    pub size_label: Option<String>,
    /// llama.cpp's name for `general.file_type` (e.g. Q4_K_M).
    pub quantization: String,
    pub context_length: usize,
    pub embedding_length: usize,
    pub block_count: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub feed_forward_length: usize,
    pub vocab_size: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub chat_template: Option<String>,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
}

impl ModelInfo {
    /// Ollama's rendering of a parameter count: "494.03M", "1.54B".
    pub fn parameter_size(&self) -> String {
        let p = self.parameter_count as f64;
        if p >= 1e9 {
            format!("{:.2}B", p / 1e9)
        } else {
            format!("{:.2}M", p / 1e6)
        }
    }
}

/// An opened, checked GGUF file. The reader is positioned anywhere; tensor reads seek.
/// The file is also mapped (read-only), so that CPU kernels can compute from its bytes
/// without a copy.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub reader: BufReader<File>,
    pub file_size: u64,
    map: Option<Arc<memmap2::Mmap>>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        if !path.exists() {
            return Err(GgufError::Missing {
                path: path.to_path_buf(),
            });
        }
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let file_size = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        let corrupt = |message: String| GgufError::Corrupt {
            path: path.to_path_buf(),
            message,
        };
        // Walk the header first: every count and length it declares must fit in the
        // file, what it builds must fit in a memory budget the size of the file, and its
        // alignment must be usable (candle divides by it), before candle's parser builds
        // anything from it.
        let declared = walk_header(&mut reader, file_size).map_err(corrupt)?;
        if let Some(over) = declared.over_budget {
            // A header too big for its file is most often a download cut short: say so
            // when a tensor is declared past the end.
            return Err(match declared.farthest {
                Some((needed, tensor)) if needed > file_size => GgufError::Truncated {
                    path: path.to_path_buf(),
                    tensor,
                    needed,
                    have: file_size,
                },
                _ => corrupt(over),
            });
        }
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| corrupt(e.to_string()))?;
        // The walk leaves nothing for candle's parser to trip on that we know of; should
        // it still panic, that is a corrupt file, not a crash.
        let parsed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Content::read(&mut reader)));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(corrupt(without_backtrace(e))),
            Err(_) => return Err(corrupt("header could not be parsed".into())),
        };
        // candle keeps one entry per name: fewer entries than declared means a name came
        // twice, and which of the two is used would be an accident.
        if content.tensor_infos.len() as u64 != declared.tensors {
            return Err(corrupt(format!(
                "{} tensors declared but only {} distinct names (a tensor name is repeated)",
                declared.tensors,
                content.tensor_infos.len()
            )));
        }
        if content.metadata.len() as u64 != declared.keys {
            return Err(corrupt(format!(
                "{} metadata keys declared but only {} distinct ones (a key is repeated)",
                declared.keys,
                content.metadata.len()
            )));
        }
        // SAFETY: the mapping is read-only and lives as long as the tensors borrowing it.
        // As with every mmap-ing engine (llama.cpp, Ollama), rewriting the file while it
        // is served is not supported; replacing it (a new inode, as downloads do) is.
        let map = unsafe { memmap2::Mmap::map(reader.get_ref()) }
            .ok()
            .filter(|m| m.len() as u64 == file_size)
            .map(Arc::new);
        let f = GgufFile {
            path: path.to_path_buf(),
            content,
            reader,
            file_size,
            map,
        };
        f.check_tensor_bounds(declared.alignment)?;
        Ok(f)
    }

    /// Every tensor's shape has a size that can be computed, its bytes start aligned and
    /// lie inside the file, and no two tensors share bytes.
    fn check_tensor_bounds(&self, alignment: u64) -> Result<(), GgufError> {
        let mut ranges = Vec::with_capacity(self.content.tensor_infos.len());
        for (name, info) in &self.content.tensor_infos {
            let dims = info.shape.dims();
            let absurd = || self.corrupt(format!("tensor '{name}' has absurd shape {dims:?}"));
            let elems = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(absurd)?;
            let block = info.ggml_dtype.block_size() as u64;
            if elems % block != 0 {
                return Err(self.corrupt(format!(
                    "tensor '{name}' has {elems} elements, not a multiple of its block size {block}"
                )));
            }
            let bytes = (elems / block)
                .checked_mul(info.ggml_dtype.type_size() as u64)
                .filter(|&b| usize::try_from(b).is_ok())
                .ok_or_else(absurd)?;
            if info.offset % alignment != 0 {
                return Err(self.corrupt(format!(
                    "tensor '{name}' starts at offset {}, not a multiple of the alignment {alignment}",
                    info.offset
                )));
            }
            let start = self
                .content
                .tensor_data_offset
                .checked_add(info.offset)
                .ok_or_else(|| self.corrupt(format!("tensor '{name}' has an absurd offset")))?;
            let end = start
                .checked_add(bytes)
                .ok_or_else(|| self.corrupt(format!("tensor '{name}' has an absurd offset")))?;
            if end > self.file_size {
                return Err(GgufError::Truncated {
                    path: self.path.clone(),
                    tensor: name.clone(),
                    needed: end,
                    have: self.file_size,
                });
            }
            if bytes > 0 {
                ranges.push((start, end, name));
            }
        }
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
            if start < end {
                return Err(self.corrupt(format!(
                    "tensors '{a}' and '{b}' overlap (bytes {start}..{end} belong to both)"
                )));
            }
        }
        Ok(())
    }

    fn corrupt(&self, message: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    fn unsupported(&self, message: String) -> GgufError {
        GgufError::Unsupported {
            path: self.path.clone(),
            message,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn get_usize(&self, key: &str) -> Result<usize, GgufError> {
        match self.get(key) {
            Some(v) => value_as_u64(v)
                .map(|n| n as usize)
                .ok_or_else(|| self.unsupported(format!("metadata `{key}` is not an integer"))),
            None => Err(self.unsupported(format!("metadata `{key}` is missing"))),
        }
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            v => value_as_u64(v).map(|n| n as f64),
        }
    }

    fn get_str(&self, key: &str) -> Option<String> {
        self.get(key)?.to_string().ok().cloned()
    }

    /// Whether the tokenizer's vocabulary holds every one of `tokens`.
    fn has_tokens(&self, tokens: &[&str]) -> bool {
        let Some(Value::Array(vocab)) = self.get("tokenizer.ggml.tokens") else {
            return false;
        };
        tokens.iter().all(|t| {
            vocab
                .iter()
                .any(|v| matches!(v, Value::String(s) if s == t))
        })
    }

    /// Reads and checks the metadata; only the qwen2 architecture is supported.
    pub fn info(&self) -> Result<ModelInfo, GgufError> {
        let arch = self
            .get_str("general.architecture")
            .ok_or_else(|| self.unsupported("metadata `general.architecture` is missing".into()))?;
        if arch != "qwen2" {
            return Err(self.unsupported(format!(
                "architecture '{arch}' (duet runs Qwen2 / Qwen2.5-Coder models)"
            )));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let embedding_length = self.get_usize(&k("embedding_length"))?;
        let head_count = self.get_usize(&k("attention.head_count"))?;
        let head_count_kv = self.get_usize(&k("attention.head_count_kv"))?;
        if head_count == 0
            || head_count_kv == 0
            || embedding_length % head_count != 0
            || head_count % head_count_kv != 0
        {
            return Err(self.unsupported(format!(
                "inconsistent attention shape: {embedding_length} wide, {head_count} heads, {head_count_kv} kv heads"
            )));
        }
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(t) => match t.shape.dims() {
                [rows, _] => *rows,
                dims => {
                    return Err(self.unsupported(format!(
                        "tensor `token_embd.weight` has shape {dims:?}, not a matrix"
                    )))
                }
            },
            None => return Err(self.unsupported("tensor `token_embd.weight` is missing".into())),
        };
        let parameter_count = self
            .content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        let file_type = self.get("general.file_type").and_then(value_as_u64);
        Ok(ModelInfo {
            path: self.path.clone(),
            file_size: self.file_size,
            name: self.get_str("general.name"),
            basename: self.get_str("general.basename"),
            fill_in_middle: self.has_tokens(&[
                "<|fim_prefix|>",
                "<|fim_suffix|>",
                "<|fim_middle|>",
            ]),
            size_label: self.get_str("general.size_label"),
            parameter_count,
            quantization: file_type
                .map(file_type_name)
                .unwrap_or_else(|| "unknown".into()),
            context_length: self.get_usize(&k("context_length"))?,
            embedding_length,
            block_count: self.get_usize(&k("block_count"))?,
            head_count,
            head_count_kv,
            feed_forward_length: self.get_usize(&k("feed_forward_length"))?,
            vocab_size,
            rope_freq_base: self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0) as f32,
            rms_norm_eps: self
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            chat_template: self.get_str("tokenizer.chat_template"),
            eos_token_id: self
                .get("tokenizer.ggml.eos_token_id")
                .and_then(value_as_u64)
                .map(|v| v as u32),
            bos_token_id: self
                .get("tokenizer.ggml.bos_token_id")
                .and_then(value_as_u64)
                .map(|v| v as u32),
            architecture: arch,
        })
    }
}

impl WeightSource for GgufFile {
    fn describe(&self, name: &str) -> Option<(GgmlDType, Vec<usize>)> {
        let info = self.content.tensor_infos.get(name)?;
        Some((info.ggml_dtype, info.shape.dims().to_vec()))
    }

    fn read_raw(&self, name: &str, dst: &mut [u8]) -> candle_core::Result<()> {
        let (start, size) = self.locate(name)?;
        if dst.len() != size {
            candle_core::bail!("tensor '{name}' has {size} bytes, not {}", dst.len());
        }
        std::os::unix::fs::FileExt::read_exact_at(self.reader.get_ref(), dst, start)?;
        Ok(())
    }

    fn parts(&self, name: &str) -> candle_core::Result<Vec<TensorBytes>> {
        let Some(map) = &self.map else {
            return Ok(vec![read_owned(self, name)?]);
        };
        let (start, len) = self.locate(name)?;
        Ok(vec![TensorBytes::Mapped {
            map: map.clone(),
            start: start as usize,
            len,
        }])
    }
}

impl GgufFile {
    /// Where a tensor's bytes start in the file, and how many there are.
    fn locate(&self, name: &str) -> candle_core::Result<(u64, usize)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("tensor '{name}' not found")))?;
        let size = byte_size(info.ggml_dtype, info.shape.dims());
        Ok((self.content.tensor_data_offset + info.offset, size))
    }
}

/// What a GGUF header declares, as [`walk_header`] found it.
struct Declared {
    tensors: u64,
    keys: u64,
    /// Where tensor data is aligned (`general.alignment`, else GGUF's 32).
    alignment: u64,
    /// Why the parsed header would take more memory than the file's size allows, if it
    /// would: the file must not be handed to candle's parser.
    over_budget: Option<String>,
    /// The byte where the farthest tensor's data ends (as far as its type is known),
    /// and its name.
    farthest: Option<(u64, String)>,
}

/// The deepest nesting of arrays accepted (candle's parser allows 64; real files use 1).
const MAX_DEPTH: usize = 16;

/// What parsing a piece of metadata may allocate, counted generously (candle's parser
/// grows its vectors by doubling and copies each string once more, three times over
/// when its bytes are not UTF-8): per array element, per string byte, per key or tensor.
const VALUE_COST: u64 = 2 * std::mem::size_of::<Value>() as u64;
const BYTE_COST: u64 = 4;
const ENTRY_COST: u64 =
    2 * (std::mem::size_of::<String>() + std::mem::size_of::<Value>() + 16) as u64;
/// The budget of a small file: what any header may take whatever the file's size.
const MIN_BUDGET: u64 = 64 << 10;
const TENSOR_COST: u64 = 2
    * (std::mem::size_of::<String>() + std::mem::size_of::<gguf_file::TensorInfo>() + 16) as u64
    + 4 * 8;

/// Reads a GGUF header without building it: every count and length must fit in what is
/// left of the file (so a crafted count is refused before anything is reserved for it),
/// what candle's parser will allocate for the metadata and tensor table must fit in a
/// budget of the file's own size (64 KiB at least; a model's header is a sliver of its file; one made of
/// millions of one-byte values would take 64 times its size as parsed values), arrays
/// nest at most [`MAX_DEPTH`] deep, and `general.alignment`, when set, is an integer
/// power of two (candle divides by it).
fn walk_header<R: Read + Seek>(
    reader: &mut BufReader<R>,
    file_size: u64,
) -> Result<Declared, String> {
    let mut w = Walker {
        reader,
        pos: 0,
        size: file_size,
        v1: false,
        cost: 0,
    };
    let magic = w.u32()?;
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return Err(format!("unknown magic 0x{magic:08x}"));
    }
    w.v1 = match w.u32()? {
        1 => true,
        2 | 3 => false,
        v => return Err(format!("unsupported GGUF version {v}")),
    };
    let tensors = w.len()?;
    let keys = w.len()?;
    // The smallest key-value pair and tensor entry the format can hold.
    let min_key = w.prefix() + 4 + 1;
    let min_tensor = w.prefix() + 4 + 4 + 8;
    let needed = keys
        .saturating_mul(min_key)
        .saturating_add(tensors.saturating_mul(min_tensor));
    if needed > w.left() {
        return Err(format!(
            "header declares {tensors} tensors and {keys} metadata keys, which need at least \
             {needed} bytes, but only {} are left",
            w.left()
        ));
    }
    let mut alignment = None;
    for _ in 0..keys {
        let key_len = w.len()?;
        let is_alignment = key_len == "general.alignment".len() as u64;
        let mut key = [0u8; 17];
        if is_alignment {
            w.read(&mut key)?;
        } else {
            w.skip(key_len, "a metadata key")?;
        }
        w.charge(ENTRY_COST.saturating_add(key_len.saturating_mul(BYTE_COST)));
        let ty = w.u32()?;
        if is_alignment && &key == b"general.alignment" {
            let value = match ty {
                0 => w.read_n::<1>()?[0] as u64,
                1 => i8::from_le_bytes(w.read_n()?).max(0) as u64,
                2 => u16::from_le_bytes(w.read_n()?) as u64,
                3 => i16::from_le_bytes(w.read_n()?).max(0) as u64,
                4 => u32::from_le_bytes(w.read_n()?) as u64,
                5 => i32::from_le_bytes(w.read_n()?).max(0) as u64,
                _ => {
                    return Err(format!(
                        "general.alignment has value type {ty}, not an integer"
                    ))
                }
            };
            if !value.is_power_of_two() {
                return Err(format!("general.alignment {value} is not a power of two"));
            }
            alignment = Some(value);
        } else {
            w.value(ty, 0)?;
        }
    }
    let alignment = alignment.unwrap_or(gguf_file::DEFAULT_ALIGNMENT);
    // The tensor whose data ends farthest: (end relative to the data, its name).
    let mut farthest: Option<(u64, String)> = None;
    for i in 0..tensors {
        let name_len = w.len()?;
        // A name longer than a line is not kept (for the error of a file cut short).
        let mut name = [0u8; 256];
        let kept = usize::try_from(name_len).ok().filter(|&n| n <= name.len());
        match kept {
            Some(n) => w.read(&mut name[..n])?,
            None => w.skip(name_len, "a tensor name")?,
        }
        let n_dims = w.u32()? as u64;
        // candle refuses more than 4; the bytes must be there either way.
        let mut elements = Some(1u64);
        if n_dims <= 4 {
            for _ in 0..n_dims {
                let d = w.len()?;
                elements = elements.and_then(|e| e.checked_mul(d));
            }
        } else {
            w.skip(n_dims.saturating_mul(w.prefix()), "a tensor's dimensions")?;
        }
        let ty = w.u32()?;
        let offset = u64::from_le_bytes(w.read_n()?);
        // The bytes it takes, where its type is known (else only where it starts).
        let bytes = block_of(ty)
            .zip(elements)
            .and_then(|((values, bytes), e)| (e / values).checked_mul(bytes))
            .unwrap_or(0);
        let end = offset.saturating_add(bytes);
        if farthest.as_ref().is_none_or(|(e, _)| end > *e) {
            let name = match kept {
                Some(n) => String::from_utf8_lossy(&name[..n]).into_owned(),
                None => format!("#{i}"),
            };
            farthest = Some((end, name));
        }
        w.charge(TENSOR_COST.saturating_add(name_len.saturating_mul(BYTE_COST)));
    }
    let data_start = w.pos.next_multiple_of(alignment);
    let farthest = farthest.map(|(end, name)| (data_start.saturating_add(end), name));
    Ok(Declared {
        tensors,
        keys,
        alignment,
        over_budget: w.over_budget(),
        farthest,
    })
}

/// Values per block and bytes per block of the ggml types candle reads (what
/// `GgmlDType` knows, which candle keeps to itself).
fn block_of(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        6 => (32, 22),
        7 => (32, 24),
        8 => (32, 34),
        9 => (32, 36),
        10 => (256, 84),
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        _ => return None,
    })
}

struct Walker<'a, R> {
    reader: &'a mut BufReader<R>,
    pos: u64,
    size: u64,
    v1: bool,
    /// What the parsed header will take in memory so far.
    cost: u64,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// Bytes of a length (and of a dimension): 4 in GGUF v1, 8 after.
    fn prefix(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), String> {
        if buf.len() as u64 > self.left() {
            return Err(format!(
                "the header runs past the end of the file at byte {}",
                self.pos
            ));
        }
        self.reader.read_exact(buf).map_err(|e| e.to_string())?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn read_n<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.read(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.read_n()?))
    }

    fn len(&mut self) -> Result<u64, String> {
        if self.v1 {
            Ok(self.u32()? as u64)
        } else {
            Ok(u64::from_le_bytes(self.read_n()?))
        }
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.left() {
            return Err(format!(
                "{what} of {n} bytes at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.size
            ));
        }
        // Within the buffer when it can (a vocabulary is 150k short strings).
        self.reader
            .seek_relative(n as i64)
            .map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(())
    }

    /// Counts what parsing will allocate; [`over_budget`](Self::over_budget) judges it
    /// once the walk is done (the walk itself allocates nothing).
    fn charge(&mut self, bytes: u64) {
        self.cost = self.cost.saturating_add(bytes);
    }

    fn over_budget(&self) -> Option<String> {
        (self.cost > self.size.max(MIN_BUDGET)).then(|| {
            format!(
                "its header alone would take more memory once parsed than the file's {} \
                 bytes (the file is cut short, or made to exhaust memory)",
                self.size
            )
        })
    }

    /// Skips one value of type `ty`, counting what it will cost.
    fn value(&mut self, ty: u32, depth: usize) -> Result<(), String> {
        match ty {
            8 => {
                let n = self.len()?;
                self.skip(n, "a string")?;
                self.charge(n.saturating_mul(BYTE_COST));
                Ok(())
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("arrays nest more than {MAX_DEPTH} deep"));
                }
                let elem = self.u32()?;
                let n = self.len()?;
                self.charge(n.saturating_mul(VALUE_COST));
                match fixed_size(elem) {
                    Some(size) => self.skip(n.saturating_mul(size), "an array"),
                    None => {
                        // Each string or array takes at least its length prefix.
                        let min = self.prefix() + if elem == 9 { 4 } else { 0 };
                        if n.saturating_mul(min) > self.left() {
                            return Err(format!(
                                "an array of {n} values at byte {} runs past the end of the file",
                                self.pos
                            ));
                        }
                        (0..n).try_for_each(|_| self.value(elem, depth + 1))
                    }
                }
            }
            _ => match fixed_size(ty) {
                Some(size) => self.skip(size, "a value"),
                None => Err(format!("unknown metadata value type {ty}")),
            },
        }
    }
}

/// Bytes of a value of a fixed-size GGUF type; `None` for strings, arrays and unknowns.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A candle error's message without the backtrace it carries when RUST_BACKTRACE is set
/// (a user needs the reason, and rendering the backtrace reads the binary's debug
/// information: 150 MB for one corrupt header).
fn without_backtrace(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        e => e.to_string(),
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

/// llama.cpp's `llama_ftype` names, as Ollama shows them in `details.quantization_level`.
pub fn file_type_name(ft: u64) -> String {
    match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type {ft}"),
    }
    .to_string()
}

/// Re-export for callers that build GGUF files (tests, generated weights).
pub use gguf_file::Value as GgufValue;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::{SyntheticWeights, TensorSpec};
    use crate::model::weights::linear;
    use candle_core::{Device, Tensor};

    /// A file's tensors are served from the mapping, byte for byte as read, and the
    /// matrices computed from the mapping give what the same bytes read give.
    #[test]
    fn tensors_come_from_the_mapped_file() {
        let cpu = Device::Cpu;
        let specs: Vec<TensorSpec> = [
            ("a", GgmlDType::Q4K),
            ("b", GgmlDType::Q6K),
            ("c", GgmlDType::Q8_0),
        ]
        .into_iter()
        .map(|(name, dtype)| TensorSpec {
            name: name.into(),
            dims: vec![48, 512],
            dtype,
        })
        .collect();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let src = SyntheticWeights::of(specs, 7);
        let tensors: Vec<_> = names.iter().map(|n| src.tensor(n, &cpu).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let mut out = std::fs::File::create(&path).unwrap();
        let named: Vec<(&str, &candle_core::quantized::QTensor)> =
            names.iter().map(|n| n.as_str()).zip(&tensors).collect();
        gguf_file::write(&mut out, &[], &named).unwrap();
        drop(out);

        let file = GgufFile::open(&path).unwrap();
        let x = Tensor::randn(0f32, 1f32, (1, 3, 512), &cpu).unwrap();
        for name in &names {
            let parts = file.parts(name).unwrap();
            assert!(matches!(parts[..], [TensorBytes::Mapped { .. }]), "{name}");
            let (dtype, dims) = file.describe(name).unwrap();
            let mut read = vec![0u8; byte_size(dtype, &dims)];
            file.read_raw(name, &mut read).unwrap();
            assert!(*parts[0] == read[..], "{name}");
            let want = linear(&src, name, &cpu).unwrap().forward(&x).unwrap();
            let got = linear(&file, name, &cpu).unwrap().forward(&x).unwrap();
            let diff = (want - got).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
    }
}

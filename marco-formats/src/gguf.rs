//! A small, defensive reader (and writer) for GGUF v2/v3 files, the format of llama.cpp.
//!
//! The file is memory-mapped; [`GgufFile::open`] parses the header, the metadata and the tensor
//! table, and validates every tensor's type, size, alignment and extent before returning, so a
//! later [`GgufFile::tensor_bytes`] is a plain slice of the map. Nothing trusts a length read
//! from the file: each count is compared with the bytes that remain before anything is
//! allocated, every offset is bounds-checked, and each fault becomes a typed [`FormatError`]
//! that names the file (and the tensor, where there is one) — a bad file never panics.
//!
//! Tensor dimensions keep ggml's order (`dims[0]` is the innermost, contiguous one);
//! [`GgufTensorInfo::shape`] gives the row-major shape (outermost first) that burn expects.
//! Quantised tensors are dequantised through [`crate::quant::dequantize`].
//!
//! [`GgufWriter`] writes the same format; tests use it to build small (and deliberately
//! broken) files.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::quant::{self, GgmlType};

use crate::error::{FormatError, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor has.
const MAX_DIMS: u32 = 4;
/// Arrays nested deeper than this are rejected (no real file nests at all).
const MAX_ARRAY_DEPTH: usize = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float32`.
    F32(f32),
    /// `float64`.
    F64(f64),
    /// `bool`.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values of one type.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(u64::from(v)),
            GgufValue::U16(v) => Some(u64::from(v)),
            GgufValue::U32(v) => Some(u64::from(v)),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(i64::from(v)),
            GgufValue::I16(v) => Some(i64::from(v)),
            GgufValue::I32(v) => Some(i64::from(v)),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, for either float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(f64::from(v)),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(items) => Some(items),
            _ => None,
        }
    }

    /// The GGUF type id of this value.
    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
}

/// Where a tensor lies in the file and how it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The row-major shape, outermost dimension first (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        // `open` checked that every dimension and their product fit in `usize`.
        self.dims.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A memory-mapped GGUF file whose header, metadata and tensor table have been validated.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    /// Byte ranges of each tensor inside `map`, parallel to `tensors`.
    ranges: Vec<(usize, usize)>,
    /// Index of each tensor in `tensors` by name.
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and validates `path`.
    ///
    /// Errors: [`FormatError::Io`] if it cannot be read, [`FormatError::Truncated`] if it ends
    /// early (or a tensor's data runs past its end), [`FormatError::Corrupt`] for a bad magic,
    /// version, count, string, alignment or overlapping/misaligned tensor, and
    /// [`FormatError::UnsupportedDtype`] for a tensor type marco cannot read.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| FormatError::io(&path, e))?;
        let len = file.metadata().map_err(|e| FormatError::io(&path, e))?.len();
        if len < 4 {
            return Err(truncated(&path, "the GGUF magic"));
        }
        // SAFETY: the map is read-only and private to this value. As with any mmap, a process
        // that truncates or rewrites the file while it is mapped can change what we read (or
        // fault on access); model files are not modified in place, and every read below is
        // bounds-checked against the length the map had when it was created.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FormatError::io(&path, e))?;
        let parsed = parse(&path, &map)?;
        Ok(GgufFile {
            path,
            map,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            ranges: parsed.ranges,
            by_name: parsed.by_name,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the tensor data (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata key and value.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// The string value of `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    /// The value of `key` as an unsigned integer (any non-negative integer type).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(GgufValue::as_u64)
    }

    /// The value of `key` as an `f32` (either float type).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        // Narrowing an f64 hyperparameter (an epsilon, a rope base) to f32 is what ggml does.
        self.get_f64(key).map(|v| v as f32)
    }

    /// The value of `key` as an `f64` (either float type).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(GgufValue::as_f64)
    }

    /// The boolean value of `key`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(GgufValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// The value of `key` as an array of strings (`None` if absent or not all strings).
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        self.get(key)?.as_array()?.iter().map(GgufValue::as_str).collect()
    }

    /// The value of `key` as an array of integers (`None` if absent or not all integers).
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        self.get(key)?.as_array()?.iter().map(GgufValue::as_i64).collect()
    }

    /// `general.architecture` (`llama`, `qwen2`, ...).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
            .ok_or_else(|| FormatError::corrupt(&self.path, "metadata key general.architecture is missing"))
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`, or [`FormatError::MissingTensor`].
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name
            .get(name)
            .map(|&index| &self.tensors[index])
            .ok_or_else(|| FormatError::MissingTensor { path: self.path.clone(), tensor: name.to_string() })
    }

    /// The raw stored bytes of `info` (a tensor of this file).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let index = self
            .by_name
            .get(&info.name)
            .copied()
            .filter(|&index| &self.tensors[index] == info)
            .ok_or_else(|| FormatError::MissingTensor { path: self.path.clone(), tensor: info.name.clone() })?;
        let (start, end) = self.ranges[index];
        self.map.get(start..end).ok_or_else(|| truncated(&self.path, format!("data of tensor {}", info.name)))
    }

    /// The tensor called `name` as `f32` values, dequantised, with its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.tensor_info(name)?;
        let bytes = self.tensor_bytes(info)?;
        let n_elements = usize::try_from(info.n_elements())
            .map_err(|_| FormatError::corrupt(&self.path, format!("tensor {name}: too many elements")))?;
        let values = quant::dequantize(info.ggml_type, bytes, n_elements)
            .map_err(|e| FormatError::corrupt(&self.path, format!("tensor {name} ({}): {e}", info.ggml_type.name())))?;
        Ok((info.shape(), values))
    }
}

/// What [`parse`] extracts from the bytes of a file.
struct Parsed {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    ranges: Vec<(usize, usize)>,
    by_name: HashMap<String, usize>,
}

fn truncated(path: &Path, what: impl Into<String>) -> FormatError {
    FormatError::Truncated { path: path.to_path_buf(), what: what.into() }
}

/// A bounds-checked little-endian reader over the bytes of one file.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(slice)
            }
            None => Err(truncated(self.path, what)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length read from the file, as `usize`, checked against the bytes left when each of
    /// the `len` items needs at least `min_item_bytes`.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let len = self.u64(what)?;
        let fits = usize::try_from(len)
            .ok()
            .filter(|&n| n.checked_mul(min_item_bytes).is_some_and(|bytes| bytes <= self.remaining()));
        fits.ok_or_else(|| {
            FormatError::corrupt(
                self.path,
                format!("{what} is {len}, more than the {} bytes left in the file can hold", self.remaining()),
            )
        })
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.count(1, &format!("length of {what}"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| FormatError::corrupt(self.path, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let what = format!("value of {key}");
        Ok(match type_id {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match u8::from_le_bytes(self.array(&what)?) {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                other => return Err(FormatError::corrupt(self.path, format!("{key}: bool value {other}"))),
            },
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(FormatError::corrupt(self.path, format!("{key}: arrays nested too deeply")));
                }
                let item_type = self.u32(&what)?;
                let item_size = min_value_size(item_type)
                    .ok_or_else(|| FormatError::corrupt(self.path, format!("{key}: unknown value type {item_type}")))?;
                let len = self.count(item_size, &format!("element count of {key}"))?;
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(FormatError::corrupt(self.path, format!("{key}: unknown value type {other}"))),
        })
    }
}

/// Fewest bytes a value of GGUF type `type_id` occupies (`None` for an unknown type).
fn min_value_size(type_id: u32) -> Option<usize> {
    Some(match type_id {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let mut cur = Cursor { path, bytes, pos: 0 };
    let magic: [u8; 4] = cur.array("the GGUF magic")?;
    if magic != GGUF_MAGIC {
        return Err(FormatError::corrupt(path, format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
    }
    let version = cur.u32("the GGUF version")?;
    if version == 1 {
        return Err(FormatError::corrupt(path, "GGUF version 1 is obsolete and not supported (versions 2 and 3 are)"));
    }
    if version != 2 && version != 3 {
        let hint = if version.swap_bytes() == 2 || version.swap_bytes() == 3 { " (a big-endian file?)" } else { "" };
        return Err(FormatError::corrupt(path, format!("unsupported GGUF version {version}{hint}")));
    }
    let tensor_count = cur.u64("the tensor count")?;
    let kv_count = cur.u64("the metadata count")?;
    // Each key/value needs at least a key length, a type and a one-byte value; each tensor
    // at least a name length, a dimension count, a type and an offset.
    let min_kv = 8 + 4 + 1;
    let min_tensor = 8 + 4 + 4 + 8;
    let check_count = |count: u64, min: usize, what: &str, remaining: usize| -> Result<usize> {
        usize::try_from(count).ok().filter(|&n| n.checked_mul(min).is_some_and(|b| b <= remaining)).ok_or_else(|| {
            FormatError::corrupt(
                path,
                format!("{what} is {count}, more than the {remaining} bytes left in the file can hold"),
            )
        })
    };
    let kv_count = check_count(kv_count, min_kv, "the metadata count", cur.remaining())?;
    let mut metadata = BTreeMap::new();
    for index in 0..kv_count {
        let key = cur.string(&format!("metadata key #{index}"))?;
        let type_id = cur.u32(&format!("type of {key}"))?;
        let value = cur.value(type_id, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(FormatError::corrupt(path, format!("metadata key {key} appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(value) => value
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| FormatError::corrupt(path, format!("general.alignment {value:?} is not a power of two")))?,
    };

    let tensor_count = check_count(tensor_count, min_tensor, "the tensor count", cur.remaining())?;
    let mut tensors = Vec::with_capacity(tensor_count);
    let mut by_name = HashMap::with_capacity(tensor_count);
    for index in 0..tensor_count {
        let name = cur.string(&format!("name of tensor #{index} of {tensor_count}"))?;
        let n_dims = cur.u32(&format!("dimension count of tensor {name}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(FormatError::corrupt(path, format!("tensor {name}: {n_dims} dimensions (1 to 4 allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(cur.u64(&format!("dimensions of tensor {name}"))?);
        }
        let type_id = cur.u32(&format!("type of tensor {name}"))?;
        let offset = cur.u64(&format!("offset of tensor {name}"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| FormatError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: name.clone(),
            dtype: format!("ggml type id {type_id}"),
        })?;
        if by_name.insert(name.clone(), index).is_some() {
            return Err(FormatError::corrupt(path, format!("tensor {name} appears twice")));
        }
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset });
    }

    let header_end = cur.pos as u64;
    let data_start = header_end.div_ceil(alignment).saturating_mul(alignment);
    let ranges = tensor_ranges(path, bytes.len() as u64, data_start, alignment, &tensors)?;
    Ok(Parsed { version, alignment, metadata, tensors, ranges, by_name })
}

/// Checks each tensor's size, alignment and extent, and that no two overlap; returns the byte
/// range of each inside the file.
fn tensor_ranges(
    path: &Path,
    file_len: u64,
    data_start: u64,
    alignment: u64,
    tensors: &[GgufTensorInfo],
) -> Result<Vec<(usize, usize)>> {
    let mut ranges = Vec::with_capacity(tensors.len());
    for info in tensors {
        let name = &info.name;
        let n_elements = info
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| FormatError::corrupt(path, format!("tensor {name}: dimensions {:?} overflow", info.dims)))?;
        let row = info.dims[0];
        let block = info.ggml_type.block_size() as u64;
        if !row.is_multiple_of(block) {
            return Err(FormatError::corrupt(
                path,
                format!(
                    "tensor {name}: row length {row} is not a multiple of the {} block size {block}",
                    info.ggml_type.name()
                ),
            ));
        }
        let n_bytes = (n_elements / block)
            .checked_mul(info.ggml_type.type_size() as u64)
            .ok_or_else(|| FormatError::corrupt(path, format!("tensor {name}: byte size overflows")))?;
        if !info.offset.is_multiple_of(alignment) {
            return Err(FormatError::corrupt(
                path,
                format!("tensor {name}: offset {} is not a multiple of the alignment {alignment}", info.offset),
            ));
        }
        let start = data_start.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => ranges.push((start as usize, end as usize)),
            _ => {
                return Err(truncated(
                    path,
                    format!(
                        "data of tensor {name} ({n_bytes} bytes at offset {}) runs past the end of the file \
                         ({file_len} bytes)",
                        info.offset
                    ),
                ))
            }
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| ranges[i]);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if ranges[a].1 > ranges[b].0 {
            return Err(FormatError::corrupt(
                path,
                format!("tensors {} and {} overlap", tensors[a].name, tensors[b].name),
            ));
        }
    }
    Ok(ranges)
}

/// Builds a GGUF v3 file in memory: metadata in insertion order, tensors laid out in order at
/// the alignment.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    alignment: u64,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter { alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }
}

impl GgufWriter {
    /// An empty file with the default alignment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry (`general.alignment`, if given as an integer, sets the alignment).
    pub fn metadata(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        let key = key.into();
        if key == "general.alignment" {
            if let Some(alignment) = value.as_u64().filter(|a| a.is_power_of_two()) {
                self.alignment = alignment;
            }
        }
        self.metadata.push((key, value));
        self
    }

    /// Adds a tensor from its stored bytes; `dims` in ggml order (innermost first).
    pub fn tensor(&mut self, name: impl Into<String>, dims: &[u64], ggml_type: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors.push((name.into(), dims.to_vec(), ggml_type, data));
        self
    }

    /// Adds an `F32` tensor with row-major `shape` (outermost first).
    pub fn tensor_f32(&mut self, name: impl Into<String>, shape: &[usize], values: &[f32]) -> &mut Self {
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, &dims, GgmlType::F32, data)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for (name, dims, ggml_type, data) in &self.tensors {
            write_string(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ggml_type.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        pad_to(&mut out, self.alignment);
        let data_start = out.len();
        for ((_, _, _, data), offset) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + offset as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|e| FormatError::io(path, e))
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let len = (out.len() as u64).div_ceil(alignment) * alignment;
    out.resize(len as usize, 0);
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array(items) => {
            // An empty array is written as an array of u8; readers accept any element type.
            let item_type = items.first().map_or(0, GgufValue::type_id);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}

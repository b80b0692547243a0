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
//! Two writers share one encoder of the header (metadata, tensor table, offsets at the
//! alignment). [`GgufWriter`] builds a whole file in memory; tests use it for small (and
//! deliberately broken) files. [`GgufStreamWriter`] writes a model to disk one tensor at a
//! time: the tensor table is declared up front (so every offset is known before any data),
//! then each tensor's bytes are handed over in that order, checked against their declared size
//! and padded to the alignment. It writes to `<path>.partial` and renames to `<path>` only in
//! [`GgufStreamWriter::finish`], after syncing, so a conversion that fails or is killed never
//! leaves a file that looks complete; a writer dropped unfinished deletes its partial file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
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
    /// An array of values of one type (the type of its first element; see
    /// [`GgufValue::EmptyArray`] for an empty one).
    Array(Vec<GgufValue>),
    /// An array with no elements, which still has an element type in the file (readers such
    /// as llama.cpp check that `tokenizer.ggml.merges` is an array of *strings* even when it
    /// is empty). The reader returns every empty array in this form.
    EmptyArray {
        /// The GGUF value type id of the elements (8 for strings, 5 for `int32`; the ids of
        /// the variants above, in the order of the GGUF specification).
        item_type: u32,
    },
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
            GgufValue::EmptyArray { .. } => Some(&[]),
            _ => None,
        }
    }

    /// An array of strings (typed as one even when `items` is empty).
    pub fn string_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> GgufValue {
        Self::array_of(items.into_iter().map(|s| GgufValue::String(s.into())).collect(), 8)
    }

    /// An array of `int32` (typed as one even when `items` is empty).
    pub fn i32_array(items: impl IntoIterator<Item = i32>) -> GgufValue {
        Self::array_of(items.into_iter().map(GgufValue::I32).collect(), 5)
    }

    fn array_of(items: Vec<GgufValue>, item_type: u32) -> GgufValue {
        if items.is_empty() {
            GgufValue::EmptyArray { item_type }
        } else {
            GgufValue::Array(items)
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
            GgufValue::Array(_) | GgufValue::EmptyArray { .. } => 9,
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

    /// Gives the pages of `info`'s data back (see [`crate::mapping::release_pages`]): for a
    /// loader that has copied the tensor out and will not read it again. Reading it later still
    /// works (the pages come back from the file).
    pub fn release(&self, info: &GgufTensorInfo) {
        if let Some(&index) = self.by_name.get(&info.name) {
            let (start, end) = self.ranges[index];
            crate::mapping::release_pages(&self.map, start..end);
        }
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
                if len == 0 {
                    return Ok(GgufValue::EmptyArray { item_type });
                }
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
///
/// It writes whatever it is given (a tensor's bytes need not match its dimensions), which is
/// what fault tests need; [`GgufStreamWriter`] is the checked writer for real files.
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

    /// The file's bytes (the last tensor is not padded).
    pub fn to_bytes(&self) -> Vec<u8> {
        let table: Vec<TableEntry<'_>> = self
            .tensors
            .iter()
            .map(|(name, dims, ggml_type, data)| TableEntry {
                name,
                dims,
                ggml_type: *ggml_type,
                n_bytes: data.len() as u64,
            })
            .collect();
        let (mut out, offsets) = encode_header(&self.metadata, &table, self.alignment);
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

/// A tensor as declared to [`GgufStreamWriter::create`]: its name, dimensions and type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorDesc {
    /// The tensor's name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    /// The storage type.
    pub ggml_type: GgmlType,
}

impl GgufTensorDesc {
    /// A tensor with row-major `shape` (outermost first, as Hugging Face and burn write it).
    pub fn from_shape(name: impl Into<String>, shape: &[usize], ggml_type: GgmlType) -> Self {
        GgufTensorDesc { name: name.into(), dims: shape.iter().rev().map(|&d| d as u64).collect(), ggml_type }
    }

    /// The row-major shape, outermost dimension first (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
    }

    /// Number of elements (`None` on overflow).
    pub fn n_elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes of the stored data: fails for 0 or more than 4 dimensions, a row that is not a
    /// whole number of blocks, or a size that overflows.
    pub fn n_bytes(&self) -> Result<u64> {
        if self.dims.is_empty() || self.dims.len() > MAX_DIMS as usize {
            return Err(FormatError::InvalidShape {
                reason: format!("tensor {}: {} dimensions (1 to 4 allowed)", self.name, self.dims.len()),
            });
        }
        let overflow = || FormatError::InvalidShape {
            reason: format!("tensor {}: dimensions {:?} overflow", self.name, self.dims),
        };
        let n_elements = self.n_elements().and_then(|n| usize::try_from(n).ok()).ok_or_else(overflow)?;
        let row = usize::try_from(self.dims[0]).map_err(|_| overflow())?;
        // The row check first: a tensor is a whole number of blocks per row, not just in total.
        quant::row_bytes(self.ggml_type, row)?;
        Ok(quant::row_bytes(self.ggml_type, n_elements)? as u64)
    }
}

/// Writes a GGUF v3 file to disk one tensor at a time, in a declared order (see the module
/// documentation).
///
/// ```no_run
/// # use marco_formats::gguf::{GgufStreamWriter, GgufTensorDesc, GgufValue};
/// # use marco_formats::GgmlType;
/// # fn main() -> marco_formats::Result<()> {
/// let metadata = vec![("general.architecture".to_string(), GgufValue::String("llama".into()))];
/// let tensors = vec![GgufTensorDesc::from_shape("output_norm.weight", &[4], GgmlType::F32)];
/// let mut writer = GgufStreamWriter::create("model.gguf", &metadata, tensors)?;
/// let norm: Vec<u8> = [1.0f32; 4].iter().flat_map(|v| v.to_le_bytes()).collect();
/// writer.write_tensor("output_norm.weight", &norm)?;
/// let bytes = writer.finish()?; // model.gguf.partial renamed to model.gguf
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct GgufStreamWriter {
    path: PathBuf,
    partial: PathBuf,
    /// `None` once finished (or after a failed finish).
    out: Option<BufWriter<File>>,
    alignment: u64,
    tensors: Vec<GgufTensorDesc>,
    /// Declared byte size of each tensor, parallel to `tensors`.
    sizes: Vec<u64>,
    /// Index of the next tensor to write.
    next: usize,
    /// Bytes written so far.
    position: u64,
    /// Set once the partial file has been renamed to `path`.
    renamed: bool,
}

impl GgufStreamWriter {
    /// Creates `<path>.partial` and writes the header: `metadata` in order, then the table of
    /// `tensors` with offsets at the alignment (`general.alignment` in `metadata`, else 32).
    ///
    /// Errors: [`FormatError::InvalidShape`] or [`FormatError::NotBlockMultiple`] for a tensor
    /// whose dimensions do not fit its type, [`FormatError::Corrupt`] for a repeated metadata
    /// key or tensor name or an alignment that is not a power of two, [`FormatError::Io`] if
    /// the file cannot be written.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, GgufValue)],
        tensors: Vec<GgufTensorDesc>,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut alignment = DEFAULT_ALIGNMENT;
        let mut keys = HashSet::with_capacity(metadata.len());
        for (key, value) in metadata {
            if !keys.insert(key.as_str()) {
                return Err(FormatError::corrupt(&path, format!("metadata key {key} given twice")));
            }
            if key == "general.alignment" {
                alignment = value.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
                    FormatError::corrupt(&path, format!("general.alignment {value:?} is not a power of two"))
                })?;
            }
        }
        let mut names = HashSet::with_capacity(tensors.len());
        let mut sizes = Vec::with_capacity(tensors.len());
        for tensor in &tensors {
            if !names.insert(tensor.name.as_str()) {
                return Err(FormatError::corrupt(&path, format!("tensor {} declared twice", tensor.name)));
            }
            sizes.push(tensor.n_bytes()?);
        }
        let table: Vec<TableEntry<'_>> = tensors
            .iter()
            .zip(&sizes)
            .map(|(t, &n_bytes)| TableEntry { name: &t.name, dims: &t.dims, ggml_type: t.ggml_type, n_bytes })
            .collect();
        let (header, _) = encode_header(metadata, &table, alignment);
        drop(table);

        let mut partial = path.clone().into_os_string();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| FormatError::io(&partial, e))?;
        let mut writer = GgufStreamWriter {
            path,
            partial,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            alignment,
            tensors,
            sizes,
            next: 0,
            position: 0,
            renamed: false,
        };
        // On failure the writer is dropped here, which deletes the partial file.
        writer.write_raw(&header)?;
        Ok(writer)
    }

    /// The file this writer produces (once finished).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file being written until [`finish`](Self::finish) renames it.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// The tensor table, in the order the tensors must be written.
    pub fn tensors(&self) -> &[GgufTensorDesc] {
        &self.tensors
    }

    /// The tensor expected next, if any remain.
    pub fn next_tensor(&self) -> Option<&GgufTensorDesc> {
        self.tensors.get(self.next)
    }

    /// Bytes written so far (the file's length if it were finished now).
    pub fn bytes_written(&self) -> u64 {
        self.position
    }

    /// Writes the data of tensor `name`, which must be the next one declared, and pads it to
    /// the alignment.
    ///
    /// Errors: [`FormatError::TensorOrder`] if `name` is not the next tensor,
    /// [`FormatError::TensorSize`] if `data` is not exactly its declared size (nothing is
    /// written then, so the caller may retry with the right data), [`FormatError::Io`].
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some(expected) = self.tensors.get(self.next) else {
            return Err(FormatError::TensorOrder { path: self.path.clone(), expected: None, actual: name.to_string() });
        };
        if expected.name != name {
            return Err(FormatError::TensorOrder {
                path: self.path.clone(),
                expected: Some(expected.name.clone()),
                actual: name.to_string(),
            });
        }
        let size = self.sizes[self.next];
        if data.len() as u64 != size {
            return Err(FormatError::TensorSize {
                path: self.path.clone(),
                tensor: name.to_string(),
                expected: size,
                actual: data.len() as u64,
            });
        }
        self.write_raw(data)?;
        let padding = self.position.next_multiple_of(self.alignment) - self.position;
        self.write_raw(&vec![0u8; padding as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written, flushes and syncs the file, and renames
    /// it from `<path>.partial` to `<path>` (replacing any file there). Returns the file's
    /// length in bytes.
    ///
    /// Errors: [`FormatError::MissingTensor`] naming the first tensor not written (the partial
    /// file is deleted), [`FormatError::Io`].
    pub fn finish(mut self) -> Result<u64> {
        if let Some(missing) = self.tensors.get(self.next) {
            return Err(FormatError::MissingTensor { path: self.path.clone(), tensor: missing.name.clone() });
        }
        let Some(out) = self.out.take() else {
            return Err(FormatError::io(&self.partial, std::io::Error::other("the writer already failed")));
        };
        let partial = self.partial.clone();
        let file = out.into_inner().map_err(|e| FormatError::io(&partial, e.into_error()))?;
        // Data first, then the name: a crash in between leaves only the partial file.
        file.sync_all().map_err(|e| FormatError::io(&partial, e))?;
        drop(file);
        std::fs::rename(&partial, &self.path).map_err(|e| FormatError::io(&self.path, e))?;
        self.renamed = true;
        Ok(self.position)
    }

    /// Stops writing and deletes the partial file (what dropping the writer does too).
    pub fn abort(self) {}

    fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let partial = &self.partial;
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| FormatError::io(partial, std::io::Error::other("the writer already failed")))?;
        if let Err(e) = out.write_all(bytes) {
            // A half-written tensor cannot be resumed: refuse further writes.
            self.out = None;
            return Err(FormatError::io(partial, e));
        }
        self.position += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for GgufStreamWriter {
    fn drop(&mut self) {
        // Unfinished or failed: close and remove the partial file (an error here has no one
        // to go to). After a successful `finish` it has been renamed away.
        if !self.renamed {
            self.out = None;
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// One row of the tensor table for [`encode_header`].
struct TableEntry<'a> {
    name: &'a str,
    dims: &'a [u64],
    ggml_type: GgmlType,
    /// Bytes of the tensor's data (its offset advances by this, rounded up to the alignment).
    n_bytes: u64,
}

/// The GGUF v3 header for `metadata` and `tensors`, padded to `alignment` (so the data section
/// starts right after it), and the offset of each tensor within the data section.
fn encode_header(metadata: &[(String, GgufValue)], tensors: &[TableEntry<'_>], alignment: u64) -> (Vec<u8>, Vec<u64>) {
    let mut out = Vec::new();
    out.extend_from_slice(&GGUF_MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut out, key);
        out.extend_from_slice(&value.type_id().to_le_bytes());
        write_value(&mut out, value);
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for tensor in tensors {
        write_string(&mut out, tensor.name);
        out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for d in tensor.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&tensor.ggml_type.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + tensor.n_bytes).div_ceil(alignment) * alignment;
    }
    pad_to(&mut out, alignment);
    (out, offsets)
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
            // An empty `Array` is written as an array of u8 (`EmptyArray` names its type).
            let item_type = items.first().map_or(0, GgufValue::type_id);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
        GgufValue::EmptyArray { item_type } => {
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&0u64.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("marco-gguf-stream-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sample_metadata() -> Vec<(String, GgufValue)> {
        vec![
            ("general.architecture".into(), GgufValue::String("llama".into())),
            ("llama.block_count".into(), GgufValue::U32(1)),
            ("llama.rope.freq_base".into(), GgufValue::F32(1e4)),
            ("tokenizer.ggml.tokens".into(), GgufValue::string_array(["a", "b c"])),
            ("tokenizer.ggml.merges".into(), GgufValue::string_array(Vec::<String>::new())),
            ("tokenizer.ggml.token_type".into(), GgufValue::i32_array([1, 3])),
            ("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(false)),
        ]
    }

    /// Three tensors of different types and sizes (the F32 one is not a multiple of the
    /// alignment, so the next offset needs padding).
    fn sample_tensors() -> Vec<(GgufTensorDesc, Vec<u8>)> {
        let norm: Vec<u8> = [0.5f32, 1.0, 1.5].iter().flat_map(|v| v.to_le_bytes()).collect();
        let values: Vec<f32> = (0..64).map(|i| i as f32 / 7.0 - 4.0).collect();
        vec![
            (GgufTensorDesc::from_shape("blk.0.attn_norm.weight", &[3], GgmlType::F32), norm),
            (
                GgufTensorDesc::from_shape("blk.0.attn_q.weight", &[2, 32], GgmlType::Q8_0),
                quant::quantize_q8_0(&values).unwrap(),
            ),
            (GgufTensorDesc::from_shape("output.weight", &[4, 16], GgmlType::F16), quant::encode_f16(&values)),
        ]
    }

    fn partial_of(path: &Path) -> PathBuf {
        PathBuf::from(format!("{}.partial", path.display()))
    }

    #[test]
    fn streamed_file_reads_back_equal() {
        let dir = scratch("roundtrip");
        let path = dir.join("model.gguf");
        let metadata = sample_metadata();
        let tensors = sample_tensors();
        let descs: Vec<GgufTensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
        let mut writer = GgufStreamWriter::create(&path, &metadata, descs.clone()).unwrap();
        assert!(writer.partial_path().exists() && !path.exists());
        for (desc, data) in &tensors {
            assert_eq!(writer.next_tensor(), Some(desc));
            writer.write_tensor(&desc.name, data).unwrap();
        }
        assert_eq!(writer.next_tensor(), None);
        let len = writer.finish().unwrap();
        assert!(path.exists() && !partial_of(&path).exists());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        assert_eq!(len % DEFAULT_ALIGNMENT, 0, "every tensor, the last included, is padded");

        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.version(), 3);
        assert_eq!(file.metadata().len(), metadata.len());
        for (key, value) in &metadata {
            assert_eq!(file.get(key), Some(value), "{key}");
        }
        assert_eq!(file.get_str_array("tokenizer.ggml.merges"), Some(vec![]));
        assert_eq!(file.tensors().len(), tensors.len());
        for ((desc, data), info) in tensors.iter().zip(file.tensors()) {
            assert_eq!((&info.name, &info.dims, info.ggml_type), (&desc.name, &desc.dims, desc.ggml_type));
            assert_eq!(info.offset % DEFAULT_ALIGNMENT, 0);
            assert_eq!(file.tensor_bytes(info).unwrap(), data.as_slice());
        }
        let (shape, norm) = file.tensor_f32("blk.0.attn_norm.weight").unwrap();
        assert_eq!((shape, norm), (vec![3], vec![0.5, 1.0, 1.5]));

        // The in-memory writer lays out the same header and offsets.
        let mut memory = GgufWriter::new();
        for (key, value) in &metadata {
            memory.metadata(key.clone(), value.clone());
        }
        for (desc, data) in &tensors {
            memory.tensor(desc.name.clone(), &desc.dims, desc.ggml_type, data.clone());
        }
        let bytes = memory.to_bytes();
        let streamed = std::fs::read(&path).unwrap();
        assert_eq!(&streamed[..bytes.len()], bytes.as_slice());
        assert!(streamed[bytes.len()..].iter().all(|&b| b == 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let dir = scratch("alignment");
        let path = dir.join("model.gguf");
        let mut metadata = sample_metadata();
        metadata.push(("general.alignment".into(), GgufValue::U32(64)));
        let tensors = sample_tensors();
        let mut writer =
            GgufStreamWriter::create(&path, &metadata, tensors.iter().map(|(d, _)| d.clone()).collect()).unwrap();
        for (desc, data) in &tensors {
            writer.write_tensor(&desc.name, data).unwrap();
        }
        writer.finish().unwrap();
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.alignment(), 64);
        assert!(file.tensors().iter().all(|t| t.offset % 64 == 0));
        for ((_, data), info) in tensors.iter().zip(file.tensors()) {
            assert_eq!(file.tensor_bytes(info).unwrap(), data.as_slice());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wrong_order_length_or_missing_tensor_is_a_typed_error() {
        let dir = scratch("errors");
        let path = dir.join("model.gguf");
        let tensors = sample_tensors();
        let descs: Vec<GgufTensorDesc> = tensors.iter().map(|(d, _)| d.clone()).collect();
        let mut writer = GgufStreamWriter::create(&path, &sample_metadata(), descs.clone()).unwrap();

        let err = writer.write_tensor("output.weight", &tensors[2].1).unwrap_err();
        assert!(
            matches!(&err, FormatError::TensorOrder { expected: Some(e), actual, .. }
                if e == "blk.0.attn_norm.weight" && actual == "output.weight"),
            "{err:?}"
        );
        let err = writer.write_tensor("blk.0.attn_norm.weight", &tensors[0].1[..8]).unwrap_err();
        assert!(matches!(err, FormatError::TensorSize { expected: 12, actual: 8, .. }), "{err:?}");
        // Nothing was written by the failed calls: the right data still goes in.
        writer.write_tensor("blk.0.attn_norm.weight", &tensors[0].1).unwrap();
        let err = writer.finish().unwrap_err();
        assert!(matches!(&err, FormatError::MissingTensor { tensor, .. } if tensor == "blk.0.attn_q.weight"));
        assert!(!path.exists() && !partial_of(&path).exists(), "a failed finish leaves no file");

        // One tensor too many.
        let mut writer = GgufStreamWriter::create(&path, &sample_metadata(), descs[..1].to_vec()).unwrap();
        writer.write_tensor("blk.0.attn_norm.weight", &tensors[0].1).unwrap();
        let err = writer.write_tensor("output.weight", &tensors[2].1).unwrap_err();
        assert!(matches!(err, FormatError::TensorOrder { expected: None, .. }), "{err:?}");
        writer.finish().unwrap();
        assert!(path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_declarations_are_rejected_before_any_file_exists() {
        let dir = scratch("declarations");
        let path = dir.join("model.gguf");
        let create = |metadata: &[(String, GgufValue)], tensors: Vec<GgufTensorDesc>| {
            GgufStreamWriter::create(&path, metadata, tensors).map(|_| ()).unwrap_err()
        };
        let q8 = |name: &str, shape: &[usize]| GgufTensorDesc::from_shape(name, shape, GgmlType::Q8_0);
        assert!(matches!(create(&[], vec![q8("a", &[4, 48])]), FormatError::NotBlockMultiple { .. }));
        // 2 x 16 is 32 elements, but each row is half a block.
        assert!(matches!(create(&[], vec![q8("a", &[2, 16])]), FormatError::NotBlockMultiple { .. }));
        assert!(matches!(create(&[], vec![q8("a", &[])]), FormatError::InvalidShape { .. }));
        assert!(matches!(create(&[], vec![q8("a", &[1, 32]), q8("a", &[1, 32])]), FormatError::Corrupt { .. }));
        let twice = vec![("k".to_string(), GgufValue::U8(1)), ("k".to_string(), GgufValue::U8(2))];
        assert!(matches!(create(&twice, vec![]), FormatError::Corrupt { .. }));
        let odd = vec![("general.alignment".to_string(), GgufValue::U32(24))];
        assert!(matches!(create(&odd, vec![]), FormatError::Corrupt { .. }));
        assert!(!path.exists() && !partial_of(&path).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unfinished_writer_leaves_nothing_and_keeps_an_older_file() {
        let dir = scratch("unfinished");
        let path = dir.join("model.gguf");
        std::fs::write(&path, b"an older model").unwrap();
        let tensors = sample_tensors();
        let mut writer =
            GgufStreamWriter::create(&path, &sample_metadata(), tensors.iter().map(|(d, _)| d.clone()).collect())
                .unwrap();
        writer.write_tensor(&tensors[0].0.name, &tensors[0].1).unwrap();
        assert!(partial_of(&path).exists());
        drop(writer);
        assert!(!partial_of(&path).exists());
        assert_eq!(std::fs::read(&path).unwrap(), b"an older model");

        let writer = GgufStreamWriter::create(&path, &sample_metadata(), vec![]).unwrap();
        writer.abort();
        assert!(!partial_of(&path).exists());
        // A finished writer replaces the older file.
        GgufStreamWriter::create(&path, &sample_metadata(), vec![]).unwrap().finish().unwrap();
        assert_eq!(GgufFile::open(&path).unwrap().tensors().len(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_arrays_keep_their_element_type() {
        let mut w = GgufWriter::new();
        w.metadata("strings", GgufValue::string_array(Vec::<&str>::new()))
            .metadata("ints", GgufValue::i32_array([]))
            .metadata("untyped", GgufValue::Array(vec![]));
        let bytes = w.to_bytes();
        let parsed = parse(Path::new("mem"), &bytes).unwrap();
        assert_eq!(parsed.metadata["strings"], GgufValue::EmptyArray { item_type: 8 });
        assert_eq!(parsed.metadata["ints"], GgufValue::EmptyArray { item_type: 5 });
        assert_eq!(parsed.metadata["untyped"], GgufValue::EmptyArray { item_type: 0 });
        assert_eq!(parsed.metadata["strings"].as_array(), Some(&[][..]));
    }
}

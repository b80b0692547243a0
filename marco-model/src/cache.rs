//! The KV cache of one sequence, kept outside the (immutable) network, shaped like the search
//! tree.
//!
//! # Design: shared segments
//! A sequence's keys and values are a chain of *segments*: zero or more frozen segments shared
//! by `Arc` with every sequence forked from the same prefix, then one growable *tail* that only
//! this sequence writes. [`KvCache::fork`] freezes the tail (compacting it to its length) and
//! hands the child the same chain: no KV of the shared prefix is copied, the child reuses its
//! parent's KV for the whole prefix, and memory grows with the distinct tokens of a tree of
//! forks, not with the sum of its path lengths. A segment is freed when the last sequence
//! holding it is released (its `Arc` drops), so a search that releases pruned subtrees keeps
//! its memory bounded by the tokens of the states it still holds.
//!
//! Attention reads the chain segment by segment ([`KvCache::runs`], the buffers in place); a sequence that was
//! never forked has one segment, so plain decoding pays nothing for the sharing. The tail is a
//! buffer with spare capacity, taken out while it is written so that it is uniquely owned and
//! written in place (the backend's `write_kv` hook), and grown or compacted by the cache's
//! [`ResizeKv`] function (the backend's `resize_kv` hook). It grows by an eighth (at least
//! [`TAIL_GRANULE`] positions), so an unfilled tail wastes at most an eighth of its length plus
//! one granule: memory in use stays close to distinct tokens × bytes per token, which
//! [`KvCache::owned_bytes`] reports honestly (at capacity).
//!
//! # Why segments and not paged blocks
//! vLLM's PagedAttention cuts every sequence into fixed blocks with reference counts, copying a
//! partly filled last block on write (copy-on-write), and its attention kernel gathers the
//! blocks through a block table. That needs a custom attention kernel per backend; burn has
//! none, and gathering blocks with generic tensor ops would copy the whole context per layer
//! and step. A tree search forks only at step boundaries, so its sharing is naturally
//! coarse: one segment per tree edge. Segments give the same sharing (no prefix computed or
//! stored twice) with ordinary dense `matmul`s over a few long segments. The trade-off: a
//! fork pays one compacting copy of the parent's *unshared* tail (at most one edge's tokens,
//! once: it is shared from then on), and attention costs one small matmul per segment, so
//! very deep trees of tiny edges are slower than one dense buffer would be. Fragmentation is
//! bounded by the tail's growth rule rather than by a block size.
//!
//! This is the seam for a paged cache: the network only needs [`KvCache::reserve`],
//! [`KvCache::write_with`], [`KvCache::runs`] and [`KvCache::commit`].

use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Keys and values of one layer over a run of positions: `[kv_heads, positions, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerKv<B: Backend> {
    /// Keys (after the rotary embedding).
    pub k: Tensor<B, 3>,
    /// Values.
    pub v: Tensor<B, 3>,
}

/// Which half of a layer's cache a buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPart {
    /// Keys (after the rotary embedding).
    Keys,
    /// Values.
    Values,
}

/// One buffer of a layer's cached keys and values, `[kv_heads, capacity, head_dim]`, of which
/// the first `len` positions are in use (a frozen segment is full; a tail has spare room).
#[derive(Debug, Clone)]
pub struct KvRun<B: Backend> {
    /// Keys (after the rotary embedding).
    pub k: Tensor<B, 3>,
    /// Values.
    pub v: Tensor<B, 3>,
    /// Positions in use.
    pub len: usize,
}

impl<B: Backend> KvRun<B> {
    /// The used positions only, `[kv_heads, len, head_dim]` (a copy on backends whose slices copy).
    pub fn used(&self) -> LayerKv<B> {
        let [kv_heads, capacity, head_dim] = self.k.dims();
        if capacity == self.len {
            return LayerKv { k: self.k.clone(), v: self.v.clone() };
        }
        let range = [0..kv_heads, 0..self.len, 0..head_dim];
        LayerKv { k: self.k.clone().slice(range.clone()), v: self.v.clone().slice(range) }
    }
}

/// A frozen run of positions, shared by every sequence that forked from it.
#[derive(Debug)]
pub struct KvSegment<B: Backend> {
    layers: Vec<LayerKv<B>>,
    len: usize,
}

impl<B: Backend> KvSegment<B> {
    /// Positions in the segment.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The shape every cache of one model shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    /// Decoder layers.
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Bytes of one stored element: the backend's float type (4 for f32, 2 for bf16).
    pub element_bytes: usize,
}

impl KvShape {
    /// Bytes one position occupies over all layers (keys and values).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * self.element_bytes
    }
}

/// The KV cache of one sequence.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    shape: KvShape,
    device: B::Device,
    frozen: Vec<Arc<KvSegment<B>>>,
    frozen_len: usize,
    /// Per-layer buffers `[kv_heads, tail_capacity, head_dim]`; empty until first written.
    tail: Vec<LayerKv<B>>,
    tail_len: usize,
    tail_capacity: usize,
    resize: ResizeKv<B>,
    /// An empty tensor that stands in for a tail buffer while [`KvCache::write_with`] has it
    /// out: cloning it is a reference count, where making an empty tensor costs an allocation
    /// per layer, part and step.
    placeholder: Tensor<B, 3>,
}

/// Makes a buffer `[kv_heads, capacity, head_dim]` whose first `used` positions are copied from
/// `old` (`None`: nothing to copy). The cache grows and compacts its tail with it, so a backend
/// can do this on its own memory instead of through generic tensor ops.
pub type ResizeKv<B> = fn(
    old: Option<Tensor<B, 3>>,
    used: usize,
    capacity: usize,
    shape: KvShape,
    device: &<B as burn::tensor::backend::BackendTypes>::Device,
) -> Tensor<B, 3>;

/// [`ResizeKv`] with burn's tensor ops (`empty` + `slice_assign`).
pub fn resize_kv_with_burn<B: Backend>(
    old: Option<Tensor<B, 3>>,
    used: usize,
    capacity: usize,
    shape: KvShape,
    device: &B::Device,
) -> Tensor<B, 3> {
    let KvShape { kv_heads, head_dim, .. } = shape;
    let buffer = Tensor::<B, 3>::empty([kv_heads, capacity, head_dim], device);
    match old {
        Some(old) if used > 0 => {
            let range = [0..kv_heads, 0..used, 0..head_dim];
            buffer.slice_assign(range.clone(), old.slice(range))
        }
        _ => buffer,
    }
}

/// Tail capacities are multiples of this many positions.
pub const TAIL_GRANULE: usize = 4;

impl<B: Backend> KvCache<B> {
    /// An empty cache.
    pub fn new(shape: KvShape, device: &B::Device) -> Self {
        Self::with_resize(shape, device, resize_kv_with_burn::<B>)
    }

    /// An empty cache that grows and compacts its tail with `resize`.
    pub fn with_resize(shape: KvShape, device: &B::Device, resize: ResizeKv<B>) -> Self {
        KvCache {
            shape,
            device: device.clone(),
            frozen: Vec::new(),
            frozen_len: 0,
            tail: Vec::new(),
            tail_len: 0,
            tail_capacity: 0,
            resize,
            placeholder: Tensor::empty([0, 0, 0], device),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.frozen_len + self.tail_len
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache's shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Whether the tail has room for `new_positions` more positions ([`KvCache::reserve`] would
    /// not grow it).
    pub fn has_room(&self, new_positions: usize) -> bool {
        self.tail_len + new_positions <= self.tail_capacity
    }

    /// Makes room for `new_positions` more positions in the tail.
    pub fn reserve(&mut self, new_positions: usize) {
        if self.has_room(new_positions) {
            return;
        }
        let needed = self.tail_len + new_positions;
        // Growth by an eighth keeps the copies amortised O(1) per position and the slack small.
        let capacity = needed.max(self.tail_capacity + self.tail_capacity / 8).div_ceil(TAIL_GRANULE) * TAIL_GRANULE;
        let (shape, used, resize) = (self.shape, self.tail_len, self.resize);
        let mut old = std::mem::take(&mut self.tail).into_iter();
        let tail: Vec<LayerKv<B>> = (0..shape.layers)
            .map(|_| {
                let (k, v) = old.next().map(|kv| (Some(kv.k), Some(kv.v))).unwrap_or((None, None));
                LayerKv {
                    k: resize(k, used, capacity, shape, &self.device),
                    v: resize(v, used, capacity, shape, &self.device),
                }
            })
            .collect();
        self.tail = tail;
        self.tail_capacity = capacity;
    }

    /// Writes the new keys and values of `layer` through `write`, which receives each tail
    /// buffer (`[kv_heads, capacity, head_dim]`, taken out so that it is uniquely owned and can
    /// be written in place), the first uncommitted position, and whether it holds values
    /// (else keys); it returns the written buffer. [`KvCache::reserve`] must have made room.
    pub fn write_with(&mut self, layer: usize, mut write: impl FnMut(Tensor<B, 3>, usize, KvPart) -> Tensor<B, 3>) {
        let at = self.tail_len;
        if let Some(slot) = self.tail.get_mut(layer) {
            let k = std::mem::replace(&mut slot.k, self.placeholder.clone());
            slot.k = write(k, at, KvPart::Keys);
            let v = std::mem::replace(&mut slot.v, self.placeholder.clone());
            slot.v = write(v, at, KvPart::Values);
        }
    }

    /// The runs of `layer` in position order (each frozen segment, then the tail including
    /// `pending` written but uncommitted positions), as whole buffers: nothing is copied.
    pub fn runs(&self, layer: usize, pending: usize) -> Vec<KvRun<B>> {
        let mut out: Vec<KvRun<B>> = self
            .frozen
            .iter()
            .filter_map(|segment| {
                segment.layers.get(layer).map(|kv| KvRun { k: kv.k.clone(), v: kv.v.clone(), len: segment.len })
            })
            .collect();
        let tail_len = self.tail_len + pending;
        if tail_len > 0 {
            if let Some(tail) = self.tail.get(layer) {
                out.push(KvRun { k: tail.k.clone(), v: tail.v.clone(), len: tail_len });
            }
        }
        out
    }

    /// Makes `positions` written positions part of the cache.
    pub fn commit(&mut self, positions: usize) {
        self.tail_len += positions;
    }

    /// Freezes the tail into a shared segment (compacted to its length).
    fn freeze_tail(&mut self) {
        if self.tail_len == 0 {
            return;
        }
        let len = self.tail_len;
        let compact = |buffer: Tensor<B, 3>| {
            if self.tail_capacity == len {
                buffer
            } else {
                (self.resize)(Some(buffer), len, len, self.shape, &self.device)
            }
        };
        let layers = std::mem::take(&mut self.tail)
            .into_iter()
            .map(|kv| LayerKv { k: compact(kv.k), v: compact(kv.v) })
            .collect();
        self.frozen.push(Arc::new(KvSegment { layers, len }));
        self.frozen_len += len;
        self.tail_len = 0;
        self.tail_capacity = 0;
    }

    /// A cache for a child sequence sharing every position of this one. Copies no KV of
    /// frozen segments; the tail is frozen (one compacting copy) and shared from then on.
    pub fn fork(&mut self) -> Self {
        self.freeze_tail();
        KvCache {
            shape: self.shape,
            device: self.device.clone(),
            frozen: self.frozen.clone(),
            frozen_len: self.frozen_len,
            tail: Vec::new(),
            tail_len: 0,
            tail_capacity: 0,
            resize: self.resize,
            placeholder: self.placeholder.clone(),
        }
    }

    /// The shared segments of this cache, for memory accounting across sequences.
    pub fn frozen_segments(&self) -> &[Arc<KvSegment<B>>] {
        &self.frozen
    }

    /// Bytes of the buffers only this cache owns (its tail, at capacity).
    pub fn owned_bytes(&self) -> usize {
        if self.tail.is_empty() {
            0
        } else {
            self.tail_capacity * self.shape.bytes_per_token()
        }
    }

    /// Bytes of a shared segment.
    pub fn segment_bytes(&self, segment: &KvSegment<B>) -> usize {
        segment.len * self.shape.bytes_per_token()
    }
}

//! The network: a Llama-family decoder (RMSNorm, rotary embeddings, grouped-query attention,
//! SwiGLU, optional q/k/v bias, tied or untied head), generic over a [`KernelBackend`].
//!
//! As in llama-burn, the module is immutable after loading and holds no per-sequence state:
//! every forward takes the sequences' [`KvCache`]s. One forward runs a *ragged batch*: any
//! number of sequences, each with any number of new tokens and its own cache length. The
//! linear layers run once over all rows of all sequences (this is what makes a batched step
//! cheap); attention runs per sequence over that sequence's cache segments, so sequences of
//! different lengths need neither padding nor masks between them.
//!
//! Rotary embeddings use the Hugging Face half-split layout (`rotate_half`); loaders of GGUF
//! files un-permute llama.cpp's interleaved q/k rows into it.

use std::sync::Mutex;

use burn::tensor::{Int, Tensor, TensorData};

use crate::backend::{AttentionShape, HostWeight, KernelBackend, LinearPath, SequenceKv};
use crate::cache::{KvCache, KvPart, KvShape};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layer_ops;
use crate::loader::{HostLinear, WeightSource};
use marco_core::TokenId;

/// A linear layer: a weight in the chosen path's layout and an optional bias.
#[derive(Debug, Clone)]
pub struct Linear<B: KernelBackend> {
    weight: LinearWeightKind<B>,
    bias: Option<Tensor<B, 2>>,
}

#[derive(Debug, Clone)]
enum LinearWeightKind<B: KernelBackend> {
    /// `[in, out]` for burn's `matmul`.
    Burn(Tensor<B, 2>),
    /// The backend kernel's own layout.
    Kernel(B::LinearWeight),
}

impl<B: KernelBackend> Linear<B> {
    /// Builds a layer from host rows `[out, in]` along `path`.
    pub fn new(
        host: HostLinear<'_>,
        out_features: usize,
        in_features: usize,
        bias: Option<Vec<f32>>,
        path: LinearPath,
        device: &B::Device,
    ) -> Result<Self> {
        let weight = match path {
            LinearPath::Burn => {
                let rows = host.into_f32()?;
                LinearWeightKind::Burn(crate::backend::dense_in_out::<B>(&rows, out_features, in_features, device))
            }
            LinearPath::Kernel | LinearPath::KernelExact => {
                let exact = path == LinearPath::KernelExact;
                let direct = match &host {
                    HostLinear::F32(rows) => {
                        B::linear_weight(HostWeight::F32(rows), out_features, in_features, exact, device)?
                    }
                    HostLinear::Ggml { ggml_type, bytes, .. } => B::linear_weight(
                        HostWeight::Ggml { ggml_type: *ggml_type, bytes: bytes.as_ref() },
                        out_features,
                        in_features,
                        exact,
                        device,
                    )?,
                };
                let weight = match direct {
                    Some(w) => w,
                    None => {
                        let rows = host.into_f32()?;
                        B::linear_weight(HostWeight::F32(&rows), out_features, in_features, exact, device)?.ok_or_else(
                            || ModelError::InvalidConfig {
                                path: "<backend>".into(),
                                reason: "the backend rejected a dense f32 weight".into(),
                            },
                        )?
                    }
                };
                LinearWeightKind::Kernel(weight)
            }
        };
        let bias = bias.map(|b| Tensor::from_data(TensorData::new(b, [1, out_features]), device));
        Ok(Linear { weight, bias })
    }

    /// `x · Wᵀ + b` for `x` of shape `[rows, in]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = match &self.weight {
            LinearWeightKind::Burn(w) => x.matmul(w.clone()),
            LinearWeightKind::Kernel(w) => B::kernel_linear(x, w),
        };
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.bias {
            Some(b) => y + b.clone(),
            None => y,
        }
    }

    /// [`Linear::forward`] of several layers sharing the input `x`: on the kernel path one
    /// fused product (activations prepared once, one thread-pool job).
    fn forward_many<const N: usize>(layers: [&Self; N], x: Tensor<B, 2>) -> [Tensor<B, 2>; N] {
        let kernel_weights: Vec<&B::LinearWeight> = layers
            .iter()
            .filter_map(|l| match &l.weight {
                LinearWeightKind::Kernel(w) => Some(w),
                LinearWeightKind::Burn(_) => None,
            })
            .collect();
        if kernel_weights.len() == N {
            let outputs: Vec<Tensor<B, 2>> = B::kernel_linear_many(x.clone(), &kernel_weights)
                .into_iter()
                .zip(layers)
                .map(|(y, layer)| layer.add_bias(y))
                .collect();
            if let Ok(outputs) = <[Tensor<B, 2>; N]>::try_from(outputs) {
                return outputs;
            }
        }
        layers.map(|l| l.forward(x.clone()))
    }

    /// Bytes of the weight and bias.
    pub fn bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeightKind::Burn(w) => w.shape().num_elements() * 4,
            LinearWeightKind::Kernel(w) => B::linear_weight_bytes(w),
        };
        w + self.bias.as_ref().map_or(0, |b| b.shape().num_elements() * 4)
    }
}

/// Makes room in every item's cache for its new tokens: on the backend's threads when
/// `parallel` and several tails must grow (most steps grow none, and then pay no handoff to
/// the threads). A growing tail is a fresh allocation and a copy per layer, mostly waiting on
/// memory, so two threads overlap their misses (8 sequences, 30 layers: 0.18-0.19 -> 0.12-0.14
/// ms per step on the 2-core development machine). The KV writes of a layer measured slower
/// split this way (their work per item is too small).
fn reserve_caches<B: KernelBackend>(items: &mut [ForwardItem<'_, B>], parallel: bool) {
    let growing = items.iter().filter(|item| !item.cache.has_room(item.tokens.len())).count();
    if !parallel || growing < 2 {
        for item in items.iter_mut() {
            item.cache.reserve(item.tokens.len());
        }
        return;
    }
    // One lock per item hands each task its own item (never contended: one task per item).
    let slots: Vec<Mutex<&mut ForwardItem<'_, B>>> = items.iter_mut().map(Mutex::new).collect();
    B::for_each_parallel(slots.len(), &|index| {
        if let Ok(mut item) = slots[index].lock() {
            let new_tokens = item.tokens.len();
            item.cache.reserve(new_tokens);
        }
    });
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer<B: KernelBackend> {
    input_norm: Tensor<B, 2>,
    q_proj: Linear<B>,
    k_proj: Linear<B>,
    v_proj: Linear<B>,
    o_proj: Linear<B>,
    post_attention_norm: Tensor<B, 2>,
    gate_proj: Linear<B>,
    up_proj: Linear<B>,
    down_proj: Linear<B>,
}

/// Cosine and sine tables of the rotary embedding, `[positions, head_dim]` (half-split layout:
/// the frequency table repeated twice).
#[derive(Debug, Clone)]
struct Rope<B: KernelBackend> {
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: KernelBackend> Rope<B> {
    fn new(config: &ModelConfig, device: &B::Device) -> Self {
        let dim = config.head_dim;
        let half = dim / 2;
        let positions = config.max_position_embeddings;
        // As transformers computes it: inverse frequencies and angles in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / (config.rope_theta as f64).powf((2 * i) as f64 / dim as f64)) as f32)
            .map(|f| config.rope_freq_rounding.round(f))
            .collect();
        let mut cos = Vec::with_capacity(positions * dim);
        let mut sin = Vec::with_capacity(positions * dim);
        for p in 0..positions {
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = (p as f32 * f) as f64;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        Rope {
            cos: Tensor::from_data(TensorData::new(cos, [positions, dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [positions, dim]), device),
        }
    }

    /// The `[rows, 1, head_dim]` cos and sin rows of `positions`.
    fn rows(&self, positions: Tensor<B, 1, Int>) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let cos = self.cos.clone().select(0, positions.clone()).unsqueeze_dim::<3>(1);
        let sin = self.sin.clone().select(0, positions).unsqueeze_dim::<3>(1);
        (cos, sin)
    }
}

/// One sequence of a ragged batch: its new tokens and its cache.
#[derive(Debug)]
pub struct ForwardItem<'a, B: KernelBackend> {
    /// Tokens to feed (not empty).
    pub tokens: &'a [TokenId],
    /// The sequence's cache; the tokens are appended to it.
    pub cache: &'a mut KvCache<B>,
}

/// Which positions' logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// The last new position of each sequence: `[sequences, vocab]`.
    Last,
    /// Every new position, sequences in order: `[total new tokens, vocab]`.
    All,
}

/// The token embedding table.
#[derive(Debug, Clone)]
enum Embedding<B: KernelBackend> {
    /// An f32 tensor whose rows are `select`ed.
    Burn(Tensor<B, 2>),
    /// The backend's linear weight, in its own storage (see
    /// [`KernelBackend::embeds_from_linear_weight`]); `shared` when the tied head is this very
    /// weight (counted once).
    Kernel { weight: B::LinearWeight, shared: bool },
}

/// The decoder network.
#[derive(Debug, Clone)]
pub struct Transformer<B: KernelBackend> {
    config: ModelConfig,
    embed: Embedding<B>,
    layers: Vec<DecoderLayer<B>>,
    norm: Tensor<B, 2>,
    lm_head: Linear<B>,
    rope: Rope<B>,
    device: B::Device,
    path: LinearPath,
}

/// The Hugging Face names of layer `i`'s tensors.
fn layer_name(i: usize, rest: &str) -> String {
    format!("model.layers.{i}.{rest}")
}

impl<B: KernelBackend> Transformer<B> {
    /// Builds the network from `source` (tensors under their Hugging Face names), checking
    /// every shape against `config`.
    pub fn load(config: ModelConfig, source: &dyn WeightSource, path: LinearPath, device: &B::Device) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let vector = |name: &str, len: usize| -> Result<Tensor<B, 2>> {
            let data = source.tensor(name, &[len])?;
            Ok(Tensor::from_data(TensorData::new(data, [1, len]), device))
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear<B>> {
            let weight = format!("{name}.weight");
            let host = source.linear(&weight, out, inp)?;
            let bias = if bias { Some(source.tensor(&format!("{name}.bias"), &[out])?) } else { None };
            let layer = Linear::new(host, out, inp, bias, path, device);
            source.release(&weight);
            layer
        };
        let (embed, tied_head) = Self::load_embedding(c, source, path, device)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let attn = |p: &str| layer_name(i, &format!("self_attn.{p}"));
            let mlp = |p: &str| layer_name(i, &format!("mlp.{p}"));
            layers.push(DecoderLayer {
                input_norm: vector(&layer_name(i, "input_layernorm.weight"), h)?,
                q_proj: linear(&attn("q_proj"), c.q_dim(), h, c.qkv_bias)?,
                k_proj: linear(&attn("k_proj"), c.kv_dim(), h, c.qkv_bias)?,
                v_proj: linear(&attn("v_proj"), c.kv_dim(), h, c.qkv_bias)?,
                o_proj: linear(&attn("o_proj"), h, c.q_dim(), false)?,
                post_attention_norm: vector(&layer_name(i, "post_attention_layernorm.weight"), h)?,
                gate_proj: linear(&mlp("gate_proj"), c.intermediate_size, h, false)?,
                up_proj: linear(&mlp("up_proj"), c.intermediate_size, h, false)?,
                down_proj: linear(&mlp("down_proj"), h, c.intermediate_size, false)?,
            });
        }
        let norm = vector("model.norm.weight", h)?;
        let lm_head = match tied_head {
            Some(head) => head,
            None if c.tie_word_embeddings => {
                // The embedding table as a linear weight: a GGUF source keeps its quantised blocks.
                let host = source.linear("model.embed_tokens.weight", c.vocab_size, h)?;
                let head = Linear::new(host, c.vocab_size, h, None, path, device)?;
                source.release("model.embed_tokens.weight");
                head
            }
            None => linear("lm_head", c.vocab_size, h, false)?,
        };
        let rope = Rope::new(c, device);
        Ok(Transformer { config, embed, layers, norm, lm_head, rope, device: device.clone(), path })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Which implementation runs the linear layers.
    pub fn linear_path(&self) -> LinearPath {
        self.path
    }

    /// The shape of this model's KV caches.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.config.num_layers,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            element_bytes: std::mem::size_of::<B::FloatElem>(),
        }
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache<B> {
        let resize: crate::cache::ResizeKv<B> = match self.path {
            LinearPath::Burn => crate::cache::resize_kv_with_burn::<B>,
            LinearPath::Kernel | LinearPath::KernelExact => <B as KernelBackend>::resize_kv,
        };
        KvCache::with_resize(self.kv_shape(), &self.device, resize)
    }

    /// The embedding table, and the head when it is tied to it (then one weight serves both,
    /// on a backend that embeds from linear weights).
    fn load_embedding(
        c: &ModelConfig,
        source: &dyn WeightSource,
        path: LinearPath,
        device: &B::Device,
    ) -> Result<(Embedding<B>, Option<Linear<B>>)> {
        let name = "model.embed_tokens.weight";
        let shape = [c.vocab_size, c.hidden_size];
        if path == LinearPath::Burn || !B::embeds_from_linear_weight() {
            let rows = source.tensor(name, &shape)?;
            return Ok((Embedding::Burn(Tensor::from_data(TensorData::new(rows, shape), device)), None));
        }
        // Read as a linear weight, so that the table is held as the head would be (a GGUF
        // source's blocks, 16-bit values, or quantised at load like every matrix).
        let host = source.linear(name, c.vocab_size, c.hidden_size)?;
        let table = Linear::new(host, c.vocab_size, c.hidden_size, None, path, device)?;
        source.release(name);
        let LinearWeightKind::Kernel(weight) = &table.weight else {
            return Err(ModelError::InvalidConfig {
                path: source.origin().to_path_buf(),
                reason: "internal: a kernel-path embedding table was built for burn".into(),
            });
        };
        let shared = c.tie_word_embeddings;
        let embed = Embedding::<B>::Kernel { weight: B::LinearWeight::clone(weight), shared };
        Ok((embed, shared.then_some(table)))
    }

    /// Bytes of the embedding table (zero when the head shares it and counts it).
    fn embedding_bytes(&self) -> usize {
        match &self.embed {
            Embedding::Burn(table) => table.shape().num_elements() * 4,
            Embedding::Kernel { shared: true, .. } => 0,
            Embedding::Kernel { weight, shared: false } => B::linear_weight_bytes(weight),
        }
    }

    /// Bytes of all weights.
    pub fn weight_bytes(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
                    .iter()
                    .map(|x| x.bytes())
                    .sum::<usize>()
            })
            .sum();
        linears + self.lm_head.bytes() + self.embedding_bytes()
    }

    /// Feeds every item's tokens (appending them to its cache) in one forward pass and
    /// returns logits (see [`LogitsAt`]). Checks token ids and context length first, so a
    /// bad request changes no cache.
    pub fn forward(&self, items: &mut [ForwardItem<'_, B>], logits_at: LogitsAt) -> Result<Tensor<B, 2>> {
        let c = &self.config;
        if items.is_empty() || items.iter().any(|item| item.tokens.is_empty()) {
            return Err(marco_core::Error::EmptyInput("a forward needs at least one token per sequence".into()).into());
        }
        for item in items.iter() {
            let needed = item.cache.len() + item.tokens.len();
            if needed > c.max_position_embeddings {
                return Err(marco_core::Error::ContextOverflow { needed, limit: c.max_position_embeddings }.into());
            }
            if let Some(&token) = item.tokens.iter().find(|&&token| token as usize >= c.vocab_size) {
                return Err(marco_core::Error::TokenOutOfRange { token, vocab_size: c.vocab_size }.into());
            }
        }
        let tokens: usize = items.iter().map(|item| item.tokens.len()).sum();
        let parts = if self.path == LinearPath::Burn { 1 } else { B::batch_parts(items.len(), tokens) };
        let h = if parts > 1 { self.hidden_in_parts(items, logits_at, parts)? } else { self.hidden(items, logits_at) };
        Ok(self.lm_head.forward(h))
    }

    /// [`Transformer::hidden`] of `parts` consecutive groups of the items (near-equal in
    /// number; a split step feeds one token per sequence), each on a thread of its own, the
    /// results stacked in item order. Every kernel is batch invariant, so each row has the bits
    /// it has in one pass over all the items.
    fn hidden_in_parts(
        &self,
        items: &mut [ForwardItem<'_, B>],
        logits_at: LogitsAt,
        parts: usize,
    ) -> Result<Tensor<B, 2>> {
        let per_part = items.len().div_ceil(parts.max(1));
        // One slot per part: its items and, once run, its hidden states.
        let slots: Vec<_> = items.chunks_mut(per_part).map(|group| Mutex::new((group, None))).collect();
        B::for_each_parallel(slots.len(), &|part| {
            if let Ok(mut slot) = slots[part].lock() {
                let (group, hidden) = &mut *slot;
                *hidden = Some(self.hidden(group, logits_at));
            }
        });
        let hidden: Option<Vec<Tensor<B, 2>>> =
            slots.into_iter().map(|slot| slot.into_inner().ok().and_then(|(_, hidden)| hidden)).collect();
        match hidden {
            Some(hidden) => Ok(Tensor::cat(hidden, 0)),
            None => Err(marco_core::Error::Backend("a part of a split forward did not finish".into()).into()),
        }
    }

    /// The final normalised hidden states (the rows [`LogitsAt`] asks for) of a forward pass
    /// over `items` (already checked by [`Transformer::forward`]), which appends their keys and
    /// values to their caches.
    fn hidden(&self, items: &mut [ForwardItem<'_, B>], logits_at: LogitsAt) -> Tensor<B, 2> {
        let mut tokens: Vec<TokenId> = Vec::new();
        let mut positions: Vec<i64> = Vec::new();
        for item in items.iter() {
            let start = item.cache.len();
            for (offset, &token) in item.tokens.iter().enumerate() {
                tokens.push(token);
                positions.push((start + offset) as i64);
            }
        }
        let total = tokens.len();
        let positions = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [total]), &self.device);
        let (cos, sin) = self.rope.rows(positions);
        reserve_caches(items, self.path != LinearPath::Burn);

        // `h` is the normalised residual stream `x`: each residual add is fused with the norm
        // that follows it (the next layer's input norm, after the last layer the final norm).
        let mut x = match &self.embed {
            Embedding::Burn(table) => {
                let ids: Vec<i64> = tokens.iter().map(|&token| token as i64).collect();
                table.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [total]), &self.device))
            }
            Embedding::Kernel { weight, .. } => {
                B::kernel_embedding(weight, &tokens, self.config.hidden_size, &self.device)
            }
        };
        let mut h = self.rms_norm(x.clone(), self.layers.first().map_or(&self.norm, |first| &first.input_norm));
        for (index, layer) in self.layers.iter().enumerate() {
            let attention = self.attention(index, layer, h, &cos, &sin, items);
            (x, h) = self.add_rms_norm(x, layer.o_proj.forward(attention), &layer.post_attention_norm);
            let gated = self.gated_up_projection(layer, h);
            let next_norm = self.layers.get(index + 1).map_or(&self.norm, |next| &next.input_norm);
            (x, h) = self.add_rms_norm(x, layer.down_proj.forward(gated), next_norm);
        }
        for item in items.iter_mut() {
            item.cache.commit(item.tokens.len());
        }

        let h = match logits_at {
            LogitsAt::All => h,
            LogitsAt::Last => {
                let mut last = Vec::with_capacity(items.len());
                let mut end = 0i64;
                for item in items.iter() {
                    end += item.tokens.len() as i64;
                    last.push(end - 1);
                }
                if last.len() == total {
                    h
                } else {
                    let n = last.len();
                    h.select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(last, [n]), &self.device))
                }
            }
        };
        h
    }

    /// `silu(gate_proj(h)) · up_proj(h)`: in one pass where the backend fuses it (kernel weights
    /// without a bias), else two products and the SwiGLU.
    fn gated_up_projection(&self, layer: &DecoderLayer<B>, h: Tensor<B, 2>) -> Tensor<B, 2> {
        if let (LinearWeightKind::Kernel(gate), LinearWeightKind::Kernel(up), None, None) =
            (&layer.gate_proj.weight, &layer.up_proj.weight, &layer.gate_proj.bias, &layer.up_proj.bias)
        {
            if let Some(gated) = B::kernel_swiglu_linear(&h, gate, up) {
                return gated;
            }
        }
        let [gate, up] = Linear::forward_many([&layer.gate_proj, &layer.up_proj], h);
        match self.path {
            LinearPath::Burn => layer_ops::swiglu(gate, up),
            LinearPath::Kernel | LinearPath::KernelExact => B::swiglu(gate, up),
        }
    }

    /// RMSNorm through the backend's hook on the kernel paths, burn's ops on the plain path.
    fn rms_norm(&self, x: Tensor<B, 2>, weight: &Tensor<B, 2>) -> Tensor<B, 2> {
        let eps = self.config.rms_norm_eps;
        match self.path {
            LinearPath::Burn => layer_ops::rms_norm(x, weight, eps),
            LinearPath::Kernel | LinearPath::KernelExact => B::rms_norm(x, weight, eps),
        }
    }

    /// `(x + delta, rms_norm(x + delta))`, through the backend's fused hook on the kernel paths.
    fn add_rms_norm(
        &self,
        x: Tensor<B, 2>,
        delta: Tensor<B, 2>,
        weight: &Tensor<B, 2>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let eps = self.config.rms_norm_eps;
        match self.path {
            LinearPath::Burn => {
                let sum = x + delta;
                (sum.clone(), layer_ops::rms_norm(sum, weight, eps))
            }
            LinearPath::Kernel | LinearPath::KernelExact => B::add_rms_norm(x, delta, weight, eps),
        }
    }

    /// The rotary embedding (times `scale`), through the backend's hook on the kernel paths.
    fn rope(&self, x: Tensor<B, 3>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>, scale: f32) -> Tensor<B, 3> {
        match self.path {
            LinearPath::Burn => layer_ops::rope(x, cos, sin, scale),
            LinearPath::Kernel | LinearPath::KernelExact => B::rope(x, cos, sin, scale),
        }
    }

    /// Self-attention of `layer` for every item; writes the items' new keys and values to
    /// their caches (uncommitted). Returns `[total rows, heads * head_dim]`.
    fn attention(
        &self,
        index: usize,
        layer: &DecoderLayer<B>,
        h: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        items: &mut [ForwardItem<'_, B>],
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let (heads, kv_heads, dim) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let total = h.dims()[0];
        let scale = 1.0 / (dim as f32).sqrt();
        let [q, k, v] = Linear::forward_many([&layer.q_proj, &layer.k_proj, &layer.v_proj], h);
        let q = self.rope(q.reshape([total, heads, dim]), cos, sin, scale);
        let k = self.rope(k.reshape([total, kv_heads, dim]), cos, sin, 1.0);
        let v = v.reshape([total, kv_heads, dim]);
        let shape = AttentionShape { heads, kv_heads, head_dim: dim };

        let mut seqs = Vec::with_capacity(items.len());
        let mut row = 0;
        for item in items.iter_mut() {
            let n = item.tokens.len();
            let rows = row..row + n;
            row += n;
            let past = item.cache.len();
            let burn_ops = self.path == LinearPath::Burn;
            item.cache.write_with(index, |buffer, at, part| {
                let new = match part {
                    KvPart::Keys => &k,
                    KvPart::Values => &v,
                };
                if burn_ops {
                    layer_ops::write_kv(buffer, at, new, rows.clone())
                } else {
                    B::write_kv(buffer, at, new, rows.clone())
                }
            });
            seqs.push(SequenceKv { rows, runs: item.cache.runs(index, n), past });
        }
        match self.path {
            LinearPath::Burn => layer_ops::attention_batch(q, &seqs, shape, Tensor::matmul),
            LinearPath::Kernel | LinearPath::KernelExact => <B as KernelBackend>::attention(q, &seqs, shape),
        }
    }
}

//! The tree-shaped KV cache: forked and batched states give the logits of the same
//! sequence run alone, forks copy no KV, memory follows the distinct tokens and comes back on
//! release, and the search policies on the default model compute each token once.
//!
//! The reference for every comparison is a second, fresh model that runs each sequence alone:
//! the same chunks fed the same way, but no fork, no other sequence in its batches and no
//! shared KV segments.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use burn_ndarray::NdArray;
use marco_core::{Budget, Granularity, LanguageModel, Problem, SamplingParams, SearchPolicy, SeqId, StepRequest};
use marco_model::loader::HfWeights;
use marco_model::{BurnLm, KernelBackend, LinearPath, ModelConfig, Transformer};
use marco_search::{
    BeamConfig, BeamSearch, GenerationConfig, GreedyConfig, GreedyReflection, Mcts, MctsConfig, Reflection,
};

type Cpu = NdArray;

/// The tiny checkpoints are fed ids directly; their tokenizer is never asked to encode.
struct IdsOnly(usize);

impl marco_core::Tokenizer for IdsOnly {
    fn encode(&self, _: &str, _: bool) -> marco_core::Result<Vec<u32>> {
        Err(marco_core::Error::Tokenizer("ids only".into()))
    }
    fn decode(&self, tokens: &[u32], _: bool) -> marco_core::Result<String> {
        Ok(format!("{tokens:?}"))
    }
    fn vocab_size(&self) -> usize {
        self.0
    }
    fn stop_tokens(&self) -> &[u32] {
        &[]
    }
    fn apply_chat_template(&self, _: &[marco_core::ChatMessage], _: bool) -> marco_core::Result<String> {
        Err(marco_core::Error::Tokenizer("ids only".into()))
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn tiny(name: &str) -> BurnLm<Cpu> {
    tiny_on::<Cpu>(name, &Default::default())
}

fn tiny_on<B: KernelBackend>(name: &str, device: &B::Device) -> BurnLm<B> {
    let dir = data(name);
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let weights = HfWeights::open(&dir).unwrap();
    let model = Transformer::<B>::load(config, &weights, LinearPath::Kernel, device).unwrap();
    let vocab = model.config().vocab_size;
    BurnLm::new(model, Box::new(IdsOnly(vocab)))
}

fn default_model() -> BurnLm<Cpu> {
    default_model_on::<Cpu>(&Default::default())
}

fn default_model_on<B: KernelBackend>(device: &B::Device) -> BurnLm<B> {
    let path = marco_model::fetch::default_model_path().expect("the default model (marco_model::fetch)");
    marco_model::load::<B>(&path, device).unwrap()
}

/// The bound on |logits of a forked/batched state − the same sequence alone|: the CPU
/// tiny checkpoints' f32 weights prefill through a GEMM that sums in another order (~1e-6).
const FORK_BOUND: f32 = 1e-4;

/// Bit-for-bit: the quantized default model on the CPU (its products and attention give a row
/// the same bits whatever the batch), and every model on CUDA (exact f32 matmuls summing in
/// order, the attention softmax included).
const EXACT: f32 = 0.0;

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn forced(seq: SeqId, token: u32) -> StepRequest {
    StepRequest { force: Some(token), ..StepRequest::new(seq, SamplingParams::greedy()) }
}

/// A deterministic token stream (xorshift) below `vocab`, different per `salt`.
fn tokens(vocab: usize, salt: u64, n: usize) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

/// The pending logits of a sequence run alone in a fresh state of `reference`, its tokens
/// (`chunks`, as fed to the tree: prompt, appends, one-token steps) prefilled in one call: no
/// fork, no other sequence in a batch, no shared KV, no step-by-step decode. On the CPU the
/// quantized default model's products are batch invariant (`marco_backend_cpu::kernels`), so
/// this is the same arithmetic row by row; f32 weights prefill through a GEMM that sums in
/// another order (~1e-6).
fn alone<B: KernelBackend>(reference: &mut BurnLm<B>, chunks: &[Vec<u32>]) -> Vec<f32> {
    let seq = reference.new_sequence(&chunks.concat()).unwrap();
    let logits = reference.pending_logits(seq).unwrap();
    reference.release(seq).unwrap();
    logits
}

/// Many sequences (more than the CPU kernels' old GEMM threshold of 16 rows) forked from one
/// prompt step together for a few tokens; each then has the logits of its tokens prefilled
/// alone.
fn wide_batch_matches_alone<B: KernelBackend>(
    lm: &mut BurnLm<B>,
    reference: &mut BurnLm<B>,
    vocab: usize,
    label: &str,
    tolerance: f32,
) {
    let prompt = tokens(vocab, 7, 23);
    for width in [3usize, 24] {
        let root = lm.new_sequence(&prompt).unwrap();
        let seqs: Vec<SeqId> = (0..width).map(|_| lm.fork(root).unwrap()).collect();
        lm.release(root).unwrap();
        let mut fed: Vec<Vec<Vec<u32>>> = vec![vec![prompt.clone()]; width];
        for step in 0..3u64 {
            let requests: Vec<StepRequest> =
                seqs.iter().enumerate().map(|(i, &s)| forced(s, tokens(vocab, 31 * step + i as u64, 1)[0])).collect();
            for (i, output) in lm.step(&requests).unwrap().into_iter().enumerate() {
                fed[i].push(vec![output.token]);
            }
        }
        let mut worst = 0.0f32;
        for (seq, chunks) in seqs.iter().zip(&fed) {
            worst = worst.max(max_abs_diff(&lm.pending_logits(*seq).unwrap(), &alone(reference, chunks)));
            lm.release(*seq).unwrap();
        }
        println!("{label}: {width} sequences stepping together vs each prefilled alone: max |diff| {worst:e}");
        assert!(worst <= tolerance, "{label}: {width} sequences: max |diff| {worst}");
    }
}

#[test]
fn wide_batches_match_sequences_run_alone_tiny() {
    for name in ["tiny-qwen2", "tiny-llama"] {
        let (mut lm, mut reference) = (tiny(name), tiny(name));
        let vocab = lm.model().config().vocab_size;
        wide_batch_matches_alone(&mut lm, &mut reference, vocab, name, FORK_BOUND);
    }
}

#[test]
fn wide_batches_match_sequences_run_alone_default_model() {
    let (mut lm, mut reference) = (default_model(), default_model());
    wide_batch_matches_alone(&mut lm, &mut reference, 20_000, "default model", EXACT);
}

/// The pending logits of `width` forks of one prompt after three batched steps (forced
/// tokens, so both runs feed the same ones), with batched steps shared by the kernel threads as
/// `split` says.
fn forks_after_batched_steps(
    lm: &mut BurnLm<Cpu>,
    vocab: usize,
    width: usize,
    split: marco_backend_cpu::BatchSplit,
) -> Vec<Vec<f32>> {
    marco_backend_cpu::set_batch_split(split);
    let prompt = tokens(vocab, 11, 19);
    let root = lm.new_sequence(&prompt).unwrap();
    let seqs: Vec<SeqId> = (0..width).map(|_| lm.fork(root).unwrap()).collect();
    lm.release(root).unwrap();
    for (i, &seq) in seqs.iter().enumerate() {
        // Ragged: the forks' lengths differ, and so do the parts' token counts.
        lm.append(seq, &tokens(vocab, 100 + i as u64, i % 3)).unwrap();
    }
    for step in 0..3u64 {
        let requests: Vec<StepRequest> =
            seqs.iter().enumerate().map(|(i, &s)| forced(s, tokens(vocab, 17 * step + i as u64, 1)[0])).collect();
        lm.step(&requests).unwrap();
    }
    let logits = seqs.iter().map(|&seq| lm.pending_logits(seq).unwrap()).collect();
    for seq in seqs {
        lm.release(seq).unwrap();
    }
    marco_backend_cpu::set_batch_split(marco_backend_cpu::BatchSplit::Auto);
    logits
}

/// A batched step cut by sequence (each thread runs its share through the whole model, as the
/// CPU backend does when its cores are far apart) gives every sequence the logits of the step
/// whose products all threads share: the same bits on the quantized default model, within
/// the 1e-4 bound on the f32 tiny checkpoints (their f32 kernels group rows differently for
/// fewer rows, ~3e-6).
#[test]
fn steps_split_by_sequence_give_the_bits_of_shared_steps() {
    use marco_backend_cpu::BatchSplit;
    let mut models: Vec<(String, BurnLm<Cpu>, usize, f32)> = ["tiny-qwen2", "tiny-llama"]
        .iter()
        .map(|name| {
            let lm = tiny(name);
            let vocab = lm.model().config().vocab_size;
            (name.to_string(), lm, vocab, FORK_BOUND)
        })
        .collect();
    models.push(("default model".into(), default_model(), 20_000, EXACT));
    for (label, lm, vocab, tolerance) in &mut models {
        for width in [2usize, 5, 8, 17] {
            let shared = forks_after_batched_steps(lm, *vocab, width, BatchSplit::Never);
            let split = forks_after_batched_steps(lm, *vocab, width, BatchSplit::Always);
            let worst = shared.iter().zip(&split).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f32::max);
            println!("{label}: {width} forks, steps split by sequence vs shared: max |diff| {worst:e}");
            assert!(worst <= *tolerance, "{label}: {width} forks: max |diff| {worst}");
        }
    }
}

/// Builds a tree of forks over one shared prompt (branches of different lengths, forks of
/// forks, an appended "reflection"), steps every branch together in one batch per token, and
/// checks every pending distribution against the same tokens run alone. Also checks the KV
/// accounting: a fork adds no KV, memory stays within 1.25× the distinct tokens, and comes
/// back to zero when everything is released.
fn tree_matches_alone<B: KernelBackend>(
    lm: &mut BurnLm<B>,
    reference: &mut BurnLm<B>,
    vocab: usize,
    label: &str,
    tolerance: f32,
) {
    let per_token = lm.counters().kv_bytes_per_token;
    assert!(per_token > 0);
    let prompt = tokens(vocab, 1, 11);
    let root = lm.new_sequence(&prompt).unwrap();
    // Each branch: its handle and the chunks it was fed.
    let mut branches: Vec<(SeqId, Vec<Vec<u32>>)> = vec![(root, vec![prompt.clone()])];
    let mut distinct = prompt.len() as u64;
    let mut worst = 0.0f32;
    for round in 0..3u64 {
        // Fork: no token computed, no KV added (the parent's tail is only compacted).
        let before = lm.counters();
        let mut children = Vec::new();
        for (i, (seq, ids)) in branches.iter().enumerate() {
            if i % 2 == 0 {
                children.push((lm.fork(*seq).unwrap(), ids.clone()));
            }
        }
        let after = lm.counters();
        assert_eq!(after.tokens_computed, before.tokens_computed, "{label}: a fork computes nothing");
        assert!(after.kv_bytes_in_use <= before.kv_bytes_in_use, "{label}: a fork copies no KV");
        branches.extend(children);
        // One branch gets a multi-token append, so the batch below mixes lengths.
        let (seq, ids) = &mut branches[0];
        let extra = tokens(vocab, 100 + round, 3 + round as usize);
        lm.append(*seq, &extra).unwrap();
        ids.push(extra.clone());
        distinct += extra.len() as u64;
        // Every branch steps together; a branch stops early so the lengths diverge further.
        for step in 0..(4 + 2 * round as usize) {
            let mut active: Vec<usize> = (0..branches.len()).filter(|&i| i != 1 || step < 2).collect();
            // The same sequences in the other order on odd steps: the previous step's logits are
            // then not this batch's rows as they stand.
            if step % 2 == 1 {
                active.reverse();
            }
            let requests: Vec<StepRequest> = active
                .iter()
                .map(|&i| forced(branches[i].0, tokens(vocab, 1000 * round + 10 * i as u64 + step as u64, 1)[0]))
                .collect();
            // What each request's forced token should score: from its own pending row (a step
            // that reuses the previous step's batch of logits must pick the right rows).
            let expected: Vec<f64> = requests
                .iter()
                .map(|r| {
                    let row = lm.pending_logits(r.seq).unwrap();
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                    row[r.force.unwrap() as usize] as f64 - lse
                })
                .collect();
            let outputs = lm.step(&requests).unwrap();
            for ((&i, output), want) in active.iter().zip(&outputs).zip(&expected) {
                assert!(
                    (output.logprob as f64 - want).abs() < 1e-4,
                    "{label}: step {step}: {} vs {want}",
                    output.logprob
                );
                branches[i].1.push(vec![output.token]);
            }
            distinct += active.len() as u64;
        }
        let lengths: Vec<usize> = branches.iter().map(|(s, _)| lm.seq_len(*s).unwrap()).collect();
        assert!(lengths.iter().any(|&l| l != lengths[0]), "{label}: lengths differ ({lengths:?})");
        for (seq, chunks) in &branches {
            let len: usize = chunks.iter().map(Vec::len).sum();
            assert_eq!(lm.seq_len(*seq).unwrap(), len);
            let diff = max_abs_diff(&lm.pending_logits(*seq).unwrap(), &alone(reference, chunks));
            assert!(diff <= tolerance, "{label}: round {round}, sequence of {len} tokens: max |diff| {diff}");
            worst = worst.max(diff);
        }
        let counters = lm.counters();
        assert_eq!(counters.tokens_computed, distinct, "{label}: every token computed once");
        let bound = 1.25 * (distinct * per_token) as f64;
        assert!(
            counters.kv_bytes_in_use >= distinct * per_token && counters.kv_bytes_in_use as f64 <= bound,
            "{label}: {} KV bytes for {distinct} distinct tokens × {per_token}",
            counters.kv_bytes_in_use
        );
    }
    println!("{label}: forked and batched tree vs each sequence prefilled alone: max |diff| {worst:e}");
    for (seq, _) in branches {
        lm.release(seq).unwrap();
    }
    assert_eq!(lm.counters().kv_bytes_in_use, 0, "{label}: released states return their KV");
    assert_eq!(lm.counters().live_sequences, 0);
}

#[test]
fn forked_and_batched_states_match_sequences_run_alone_tiny() {
    for name in ["tiny-qwen2", "tiny-llama"] {
        let mut lm = tiny(name);
        let mut reference = tiny(name);
        let vocab = lm.model().config().vocab_size;
        tree_matches_alone(&mut lm, &mut reference, vocab, name, FORK_BOUND);
    }
}

#[test]
fn forked_and_batched_states_match_sequences_run_alone_default_model() {
    let mut lm = default_model();
    let mut reference = default_model();
    // Ordinary text tokens, away from the special ids at the start of the vocabulary.
    let vocab = 20_000;
    tree_matches_alone(&mut lm, &mut reference, vocab, "default model", EXACT);
}

#[test]
fn a_long_search_at_a_fixed_budget_keeps_memory_bounded() {
    let mut lm = tiny("tiny-qwen2");
    let vocab = lm.model().config().vocab_size;
    let root = lm.new_sequence(&tokens(vocab, 5, 20)).unwrap();
    let root_bytes = lm.counters().kv_bytes_in_use;
    let mut peaks = Vec::new();
    // Many expansions, each released ("pruned") afterwards: memory returns to the root's.
    for expansion in 0..40u64 {
        let children: Vec<SeqId> = (0..3).map(|_| lm.fork(root).unwrap()).collect();
        for step in 0..24u64 {
            let requests: Vec<StepRequest> = children
                .iter()
                .enumerate()
                .map(|(i, &c)| forced(c, tokens(vocab, expansion * 97 + step * 7 + i as u64, 1)[0]))
                .collect();
            lm.step(&requests).unwrap();
        }
        peaks.push(lm.counters().kv_bytes_in_use);
        for child in children {
            lm.release(child).unwrap();
        }
        assert!(lm.counters().kv_bytes_in_use <= root_bytes, "expansion {expansion}: memory not returned");
    }
    assert!(peaks.iter().all(|&p| p == peaks[0]), "peaks differ: {peaks:?}");
    lm.release(root).unwrap();
    assert_eq!(lm.counters().kv_bytes_in_use, 0);
}

/// Runs `policy` and checks its statistics. `holds_states`: the policy keeps the states of
/// open leaves to the end (MCTS; beam search while beams are live), so where one is left the KV
/// in use reported (taken before the release) is not zero; greedy decoding drops each state as
/// it goes. Returns whether that check applied.
fn check_search<B: KernelBackend>(
    model: &mut BurnLm<B>,
    policy: &dyn SearchPolicy,
    problem: &Problem,
    label: &str,
    holds_states: bool,
) -> bool {
    let outcome = policy.search(model, problem).unwrap();
    let stats = outcome.stats;
    assert!(stats.tokens_generated > 0, "{label}: generated nothing");
    assert!(
        stats.recompute_ratio() <= 1.01,
        "{label}: {} tokens computed for {} distinct tokens",
        stats.tokens_computed,
        stats.distinct_tokens
    );
    let bound = 1.25 * (stats.distinct_tokens * stats.kv_bytes_per_token) as f64;
    assert!(stats.kv_bytes_per_token > 0, "{label}: no KV size reported");
    // A leaf that could still be expanded keeps its state; a search that ran out of open
    // leaves (every leaf terminal) rightly holds none.
    let open_leaf = outcome.tree.nodes.iter().any(|n| n.children.is_empty() && !n.terminal);
    let checked_held_states = holds_states && open_leaf;
    if checked_held_states {
        assert!(stats.kv_bytes_in_use > 0, "{label}: KV in use taken before the release");
    }
    assert!(
        stats.kv_bytes_in_use as f64 <= bound,
        "{label}: {} KV bytes in use > 1.25 × {} distinct × {}",
        stats.kv_bytes_in_use,
        stats.distinct_tokens,
        stats.kv_bytes_per_token
    );
    let after = model.counters();
    assert_eq!((after.live_sequences, after.kv_bytes_in_use), (0, 0), "{label}: states left behind");
    println!(
        "{label}: {} nodes, {} computed / {} distinct = {:.3}, KV {} B ≤ {bound:.0} B",
        stats.nodes,
        stats.tokens_computed,
        stats.distinct_tokens,
        stats.recompute_ratio(),
        stats.kv_bytes_in_use
    );
    checked_held_states
}

#[test]
fn searches_on_the_default_model_compute_each_token_once() {
    searches_compute_each_token_once(&mut default_model());
}

fn searches_compute_each_token_once<B: KernelBackend>(model: &mut BurnLm<B>) {
    let problem = Problem::from_question(model.tokenizer(), "How many r are in strawberry?", None).unwrap();
    let generation = |seed: u64| {
        GenerationConfig::default().with_granularity(Granularity::MiniStep(16)).with_seed(seed).with_temperature(0.8)
    };
    let mcts =
        Mcts::new(MctsConfig::default().with_budget(Budget::tokens(160)).with_generation(generation(3)).with_width(3))
            .unwrap();
    let mut held_states_checked = check_search(model, &mcts, &problem, "mcts", true);
    // A budget that ends the search while beams are still live (they hold their states).
    let beam = BeamSearch::new(
        BeamConfig::default()
            .with_budget(Budget::tokens(64))
            .with_generation(generation(4))
            .with_beam_width(3)
            .with_expansions(2),
    )
    .unwrap();
    held_states_checked |= check_search(model, &beam, &problem, "beam", true);
    let greedy = GreedyReflection::new(
        GreedyConfig::default()
            .with_budget(Budget::tokens(128))
            .with_generation(generation(5).with_sampling(SamplingParams::greedy()))
            .with_reflection(Reflection::default())
            .with_rounds(1),
    )
    .unwrap();
    check_search(model, &greedy, &problem, "greedy+reflection", false);
    assert!(held_states_checked, "no search ended with an open leaf: the KV-in-use check was vacuous");
}

/// The same checks on burn-cuda, where a GPU is present (`--features cuda`). The default
/// model comes from marco's cache as on the CPU (`MARCO_HOME`); on a GPU machine without it
/// (no network to fetch it) those two tests say so and skip.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use burn_cuda::{Cuda, CudaDevice};

    fn gpu() -> bool {
        let available = marco_backend_cuda::cuda_available();
        if !available {
            eprintln!("skipping: no CUDA driver");
        }
        available
    }

    /// The default model where it is already in marco's cache; `None` (with a message) else.
    fn cached_default_model() -> Option<BurnLm<Cuda>> {
        let cache = marco_model::fetch::cache_dir().ok()?;
        if !cache.join(marco_model::fetch::DEFAULT_MODEL_FILE).exists() {
            eprintln!("skipping: the default model is not in {}", cache.display());
            return None;
        }
        Some(default_model_on::<Cuda>(&CudaDevice::default()))
    }

    #[test]
    fn cuda_forked_and_batched_states_match_sequences_run_alone_tiny() {
        if !gpu() {
            return;
        }
        for name in ["tiny-qwen2", "tiny-llama"] {
            let device = CudaDevice::default();
            let mut lm = tiny_on::<Cuda>(name, &device);
            let mut reference = tiny_on::<Cuda>(name, &device);
            let vocab = lm.model().config().vocab_size;
            tree_matches_alone(&mut lm, &mut reference, vocab, &format!("cuda {name}"), EXACT);
        }
    }

    #[test]
    fn cuda_forked_and_batched_states_match_sequences_run_alone_default_model() {
        if !gpu() {
            return;
        }
        let (Some(mut lm), Some(mut reference)) = (cached_default_model(), cached_default_model()) else {
            return;
        };
        tree_matches_alone(&mut lm, &mut reference, 20_000, "cuda default model", EXACT);
    }

    #[test]
    fn cuda_wide_batches_match_sequences_run_alone_tiny() {
        if !gpu() {
            return;
        }
        for name in ["tiny-qwen2", "tiny-llama"] {
            let device = CudaDevice::default();
            let (mut lm, mut reference) = (tiny_on::<Cuda>(name, &device), tiny_on::<Cuda>(name, &device));
            let vocab = lm.model().config().vocab_size;
            wide_batch_matches_alone(&mut lm, &mut reference, vocab, &format!("cuda {name}"), EXACT);
        }
    }

    #[test]
    fn cuda_wide_batches_match_sequences_run_alone_default_model() {
        if !gpu() {
            return;
        }
        let (Some(mut lm), Some(mut reference)) = (cached_default_model(), cached_default_model()) else {
            return;
        };
        wide_batch_matches_alone(&mut lm, &mut reference, 20_000, "cuda default model", EXACT);
    }

    #[test]
    fn cuda_searches_on_the_default_model_compute_each_token_once() {
        if !gpu() {
            return;
        }
        if let Some(mut model) = cached_default_model() {
            searches_compute_each_token_once(&mut model);
        }
    }
}

/// Byte-level BPE spreads most CJK characters over two or three tokens, so token-sized edges
/// cut characters in half. The node texts along a path still concatenate to the decoded path
/// (no U+FFFD halves), while the edges decoded alone do show the cut.
#[test]
fn node_texts_along_a_path_concatenate_to_the_decoded_path() {
    let mut model = default_model();
    let problem =
        Problem::from_question(model.tokenizer(), "Translate to Chinese: Good morning, my friend.", None).unwrap();
    let greedy = GreedyReflection::new(
        GreedyConfig::default()
            .with_budget(Budget::tokens(24))
            .with_generation(
                GenerationConfig::default()
                    .with_granularity(Granularity::Token)
                    .with_sampling(SamplingParams::greedy()),
            )
            .with_rounds(0),
    )
    .unwrap();
    let outcome = greedy.search(&mut model, &problem).unwrap();
    let tree = &outcome.tree;
    let leaf = *outcome.path.last().unwrap();
    let prompt = tree.node(marco_core::NodeId::ROOT).tokens.len();
    let generated = &tree.path_tokens(leaf)[prompt..];
    let decoded = model.tokenizer().decode(generated, true).unwrap();
    let text = tree.path_text(leaf);
    // A non-terminal leaf leaves an incomplete last character to the child that would finish it.
    let expected = if tree.node(leaf).terminal { decoded.as_str() } else { decoded.trim_end_matches('\u{FFFD}') };
    assert_eq!(text, expected);
    assert!(!text.contains('\u{FFFD}'), "{text:?}");
    assert!(text.chars().any(|c| ('\u{4E00}'..='\u{9FFF}').contains(&c)), "no Chinese in {text:?}");
    let cut_edges = outcome.path[1..]
        .iter()
        .filter(|&&n| model.tokenizer().decode(&tree.node(n).tokens, true).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(cut_edges > 0, "no edge cuts a character: the test shows nothing");
}

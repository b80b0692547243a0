//! A model driven action by action (`LanguageModel::extend`, what a remote backend gets) grows
//! the same tree as the same model driven token by token, and a search replays the same in
//! any process history.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use marco_core::mock::MockModel;
use marco_core::{
    ActionGranularity, Budget, ExtendOutput, ExtendRequest, Granularity, LanguageModel, ModelCounters, NodeId, Problem,
    Result, SearchOutcome, SearchPolicy, SeqId, StepOutput, StepRequest, StopReason, Tokenizer,
};
use marco_search::{
    BeamConfig, BeamSearch, GenerationConfig, GreedyConfig, GreedyReflection, Mcts, MctsConfig, Reflection,
    SelfConsistency, SelfConsistencyConfig,
};

/// The mock model behind the whole-action contract: the search hands it actions, and the
/// default `extend` (a loop of steps) generates them.
struct WholeActions {
    inner: MockModel,
    extend_calls: usize,
}

impl LanguageModel for WholeActions {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.inner.tokenizer()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn new_sequence(&mut self, prompt: &[u32]) -> Result<SeqId> {
        self.inner.new_sequence(prompt)
    }
    fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        self.inner.fork(seq)
    }
    fn append(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        self.inner.append(seq, tokens)
    }
    fn step(&mut self, batch: &[StepRequest]) -> Result<Vec<StepOutput>> {
        self.inner.step(batch)
    }
    fn release(&mut self, seq: SeqId) -> Result<()> {
        self.inner.release(seq)
    }
    fn seq_len(&self, seq: SeqId) -> Result<usize> {
        self.inner.seq_len(seq)
    }
    fn counters(&self) -> ModelCounters {
        self.inner.counters()
    }
    fn extend(&mut self, batch: &[ExtendRequest], action: &dyn ActionGranularity) -> Result<Vec<ExtendOutput>> {
        self.extend_calls += 1;
        marco_core::extend_by_steps(self, batch, action)
    }
    fn generates_whole_actions(&self) -> bool {
        true
    }
}

fn model(seed: u64) -> MockModel {
    MockModel::builder().seed(seed).typical_length(10).build().unwrap()
}

fn problem(model: &MockModel) -> Problem {
    Problem::from_question(model.tokenizer(), "Think of a word.", None).unwrap()
}

/// The tree as a sorted list of (path of child ordinals by token content, tokens, kind):
/// independent of the order in which nodes entered the arena.
fn canonical(o: &SearchOutcome) -> Vec<(Vec<u32>, String)> {
    let tree = &o.tree;
    let mut out: Vec<(Vec<u32>, String)> = (1..tree.len())
        .map(|i| {
            let id = NodeId(i as u32);
            let node = tree.node(id);
            (tree.path_tokens(id), format!("{:?} terminal={} conf={:.6}", node.kind, node.terminal, node.confidence))
        })
        .collect();
    out.sort();
    out
}

fn policies(granularity: Granularity, seed: u64) -> Vec<Box<dyn SearchPolicy>> {
    let generation = GenerationConfig::default()
        .with_granularity(granularity)
        .with_seed(seed)
        .with_temperature(1.0)
        .with_max_depth(12);
    // Budgets that end between rounds: the token budget is far away.
    let budget = Budget::tokens(1_000_000).with_rollouts(9);
    vec![
        Box::new(
            Mcts::new(
                MctsConfig::default()
                    .with_budget(budget)
                    .with_generation(generation.clone())
                    .with_width(3)
                    .with_reflection(Reflection::default()),
            )
            .unwrap(),
        ),
        Box::new(
            BeamSearch::new(
                BeamConfig::default()
                    .with_budget(Budget::tokens(1_000_000).with_rollouts(4))
                    .with_generation(generation.clone())
                    .with_beam_width(3),
            )
            .unwrap(),
        ),
        Box::new(
            GreedyReflection::new(
                GreedyConfig::default()
                    .with_budget(Budget::tokens(1_000_000))
                    .with_generation(generation.clone().with_temperature(0.0))
                    .with_reflection(Reflection::default())
                    .with_rounds(1),
            )
            .unwrap(),
        ),
        Box::new(
            SelfConsistency::new(
                SelfConsistencyConfig::default().with_budget(Budget::tokens(1_000_000)).with_generation(generation),
            )
            .unwrap(),
        ),
    ]
}

#[test]
fn whole_actions_grow_the_same_tree_as_token_steps() {
    for granularity in [Granularity::MiniStep(4), Granularity::Token, Granularity::line()] {
        for seed in [1u64, 7] {
            for (p_token, p_action) in
                policies(granularity.clone(), seed).into_iter().zip(policies(granularity.clone(), seed))
            {
                let mut by_token = model(seed);
                let problem = problem(&by_token);
                let a = p_token.search(&mut by_token, &problem).unwrap();
                let mut by_action = WholeActions { inner: model(seed), extend_calls: 0 };
                let b = p_action.search(&mut by_action, &problem).unwrap();
                let label = format!("{} {:?} seed {seed}", a.policy, granularity);
                assert!(by_action.extend_calls > 0, "{label}: extend was never called");
                assert!(a.tree.len() > 2, "{label}: a trivial tree");
                assert_eq!(canonical(&a), canonical(&b), "{label}: the trees differ");
                assert_eq!(a.text, b.text, "{label}");
                assert_eq!(a.stats.tokens_generated, b.stats.tokens_generated, "{label}");
                assert_eq!(b.stats.recompute_ratio(), 1.0, "{label}");
                assert_eq!(by_action.inner.counters().live_sequences, 0, "{label}: states leaked");
            }
        }
    }
}

#[test]
fn a_token_budget_is_never_overrun_action_by_action() {
    for budget in [1u64, 5, 37, 100] {
        let generation =
            GenerationConfig::default().with_granularity(Granularity::MiniStep(8)).with_seed(3).with_temperature(1.0);
        let mcts = Mcts::new(
            MctsConfig::default().with_budget(Budget::tokens(budget)).with_generation(generation).with_width(3),
        )
        .unwrap();
        let mut m = WholeActions { inner: model(3), extend_calls: 0 };
        let problem = problem(&m.inner);
        let o = mcts.search(&mut m, &problem).unwrap();
        assert!(o.stats.tokens_generated <= budget, "budget {budget}: {} generated", o.stats.tokens_generated);
        if o.stats.stop_reason == StopReason::TokenBudget {
            assert_eq!(o.stats.tokens_generated, budget, "budget {budget}: stopped by a budget it did not use up");
        } else {
            assert!(budget >= 100, "budget {budget}: stopped by {:?}", o.stats.stop_reason);
        }
        assert_eq!(m.inner.counters().live_sequences, 0);
    }
}

#[test]
fn a_search_replays_after_other_searches_in_the_same_process() {
    let run = |m: &mut MockModel, seed: u64| {
        let generation = GenerationConfig::default()
            .with_granularity(Granularity::MiniStep(3))
            .with_seed(seed)
            .with_temperature(1.0);
        let mcts =
            Mcts::new(MctsConfig::default().with_budget(Budget::tokens(120)).with_generation(generation).with_width(3))
                .unwrap();
        let problem = problem(m);
        mcts.search(m, &problem).unwrap()
    };
    let mut fresh = model(5);
    let first = run(&mut fresh, 11);
    // The same model object after other searches (its sequence ids have moved on), and
    // another one whose handles were used up differently.
    let mut used = model(5);
    let _ = run(&mut used, 2);
    let _ = run(&mut used, 3);
    let again = run(&mut used, 11);
    assert_eq!(canonical(&first), canonical(&again));
    assert_eq!(first.text, again.text);
    let mut leaked = model(5);
    for _ in 0..17 {
        let s = leaked.new_sequence(&[1, 2, 3]).unwrap();
        leaked.release(s).unwrap();
    }
    let third = run(&mut leaked, 11);
    assert_eq!(canonical(&first), canonical(&third));
}

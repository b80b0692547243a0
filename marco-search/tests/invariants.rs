//! Invariants of every policy over random mock models and random configurations.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use marco_core::mock::MockModel;
use marco_core::{
    Budget, Error, Granularity, LanguageModel, NodeId, NodeKind, Problem, SamplingParams, SearchOutcome, SearchPolicy,
    StopReason,
};
use marco_search::{
    BeamConfig, BeamScore, BeamSearch, GenerationConfig, GreedyAnswerRule, GreedyConfig, GreedyReflection, Mcts,
    MctsAnswerRule, MctsConfig, Reflection, SelfConsistency, SelfConsistencyConfig,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct ModelSpec {
    seed: u64,
    sharpness: f32,
    typical_length: usize,
    max_context: usize,
}

impl ModelSpec {
    fn build(&self) -> MockModel {
        MockModel::builder()
            .seed(self.seed)
            .sharpness(self.sharpness)
            .typical_length(self.typical_length)
            .max_context(self.max_context)
            .build()
            .unwrap()
    }
}

#[derive(Debug, Clone)]
enum PolicySpec {
    Mcts { width: usize, exploration: f64, rule: MctsAnswerRule, leaves: usize },
    Beam { width: usize, expansions: usize, score: BeamScore },
    Greedy { rounds: u32, rule: GreedyAnswerRule },
    SelfConsistency { samples: usize },
}

#[derive(Debug, Clone)]
struct Spec {
    model: ModelSpec,
    policy: PolicySpec,
    generation: GenerationConfig,
    budget: Budget,
    reflection: bool,
}

fn model_spec() -> impl Strategy<Value = ModelSpec> {
    (any::<u64>(), 0.5f32..6.0, 3usize..30, prop_oneof![Just(4096usize), 52usize..120]).prop_map(
        |(seed, sharpness, typical_length, max_context)| ModelSpec { seed, sharpness, typical_length, max_context },
    )
}

fn policy_spec() -> impl Strategy<Value = PolicySpec> {
    prop_oneof![
        (
            1usize..5,
            prop_oneof![Just(0.0), Just(std::f64::consts::SQRT_2), 0.1f64..3.0],
            prop_oneof![Just(MctsAnswerRule::MostVisited), Just(MctsAnswerRule::BestValue), Just(MctsAnswerRule::Vote)],
            prop_oneof![Just(1usize), 2usize..6],
        )
            .prop_map(|(width, exploration, rule, leaves)| PolicySpec::Mcts {
                width,
                exploration,
                rule,
                leaves
            }),
        (1usize..5, 1usize..4, prop_oneof![Just(BeamScore::Reward), Just(BeamScore::SumLogprob)])
            .prop_map(|(width, expansions, score)| PolicySpec::Beam { width, expansions, score }),
        (0u32..3, prop_oneof![Just(GreedyAnswerRule::LastRound), Just(GreedyAnswerRule::MostConfident)])
            .prop_map(|(rounds, rule)| PolicySpec::Greedy { rounds, rule }),
        (1usize..6).prop_map(|samples| PolicySpec::SelfConsistency { samples }),
    ]
}

fn generation() -> impl Strategy<Value = GenerationConfig> {
    (
        prop_oneof![
            Just(Granularity::Token),
            (1usize..6).prop_map(Granularity::MiniStep),
            (1usize..12).prop_map(|n| Granularity::Step { delimiters: vec![" ".into(), "\n".into()], max_tokens: n }),
        ],
        prop_oneof![Just(0.0f32), 0.3f32..1.5],
        any::<u64>(),
        1u32..24,
        any::<bool>(),
    )
        .prop_map(|(granularity, temperature, seed, max_depth, distinct)| {
            GenerationConfig::default()
                .with_granularity(granularity)
                .with_sampling(SamplingParams { temperature, top_k: 0, top_p: 0.95, seed })
                .with_max_depth(max_depth)
                .with_distinct_first_tokens(distinct)
        })
}

fn budget() -> impl Strategy<Value = Budget> {
    (1u64..300, prop::option::of(1usize..80), prop::option::of(1usize..25)).prop_map(|(tokens, nodes, rollouts)| {
        Budget { max_generated_tokens: Some(tokens), max_nodes: nodes, max_rollouts: rollouts, max_time: None }
    })
}

fn spec() -> impl Strategy<Value = Spec> {
    (model_spec(), policy_spec(), generation(), budget(), any::<bool>()).prop_map(
        |(model, policy, generation, budget, reflection)| Spec { model, policy, generation, budget, reflection },
    )
}

fn problem(model: &MockModel) -> Problem {
    Problem::from_question(model.tokenizer(), "How many legs do 3 spiders have?", None).unwrap()
}

/// Runs the policy of `spec` on a fresh model; also returns the beam rounds for beam search.
fn run(spec: &Spec) -> (SearchOutcome, Option<Vec<Vec<NodeId>>>, MockModel) {
    let mut model = spec.model.build();
    let problem = problem(&model);
    let reflection = Reflection::default().with_max_per_path(2);
    let (outcome, rounds) = match &spec.policy {
        PolicySpec::Mcts { width, exploration, rule, leaves } => {
            let mut c = MctsConfig::default()
                .with_parallel_leaves(*leaves)
                .with_budget(spec.budget)
                .with_generation(spec.generation.clone())
                .with_width(*width)
                .with_exploration(*exploration)
                .with_answer_rule(*rule);
            if spec.reflection {
                c = c.with_reflection(reflection);
            }
            (Mcts::new(c).unwrap().search(&mut model, &problem).unwrap(), None)
        }
        PolicySpec::Beam { width, expansions, score } => {
            let mut c = BeamConfig::default()
                .with_budget(spec.budget)
                .with_generation(spec.generation.clone())
                .with_beam_width(*width)
                .with_expansions(*expansions)
                .with_score(*score);
            if spec.reflection {
                c = c.with_reflection(reflection);
            }
            let (o, rounds) = BeamSearch::new(c)
                .unwrap()
                .search_with_rounds(&mut model, &problem, &mut marco_core::NoObserver)
                .unwrap();
            (o, Some(rounds))
        }
        PolicySpec::Greedy { rounds, rule } => {
            let c = GreedyConfig::default()
                .with_budget(spec.budget)
                .with_generation(spec.generation.clone())
                .with_rounds(*rounds)
                .with_answer_rule(*rule);
            (GreedyReflection::new(c).unwrap().search(&mut model, &problem).unwrap(), None)
        }
        PolicySpec::SelfConsistency { samples } => {
            let c = SelfConsistencyConfig::default()
                .with_budget(spec.budget)
                .with_generation(spec.generation.clone())
                .with_samples(*samples);
            (SelfConsistency::new(c).unwrap().search(&mut model, &problem).unwrap(), None)
        }
    };
    (outcome, rounds, model)
}

fn check_invariants(spec: &Spec, o: &SearchOutcome, rounds: Option<&Vec<Vec<NodeId>>>, model: &MockModel) {
    let tree = &o.tree;
    // Visit counts: a node's visits are its children's plus the evaluations that ended there.
    for n in &tree.nodes {
        let children: u64 = n.children.iter().map(|c| tree.node(*c).visits).sum();
        assert_eq!(n.visits, children + n.own_evaluations, "node {}", n.id.0);
        assert!(n.confidence >= 0.0 && n.confidence <= 1.0);
        assert!(n.value_sum >= -1e-12 && n.value_sum <= n.visits as f64 + 1e-9, "node {} values", n.id.0);
        if let Some(p) = n.parent {
            assert!(tree.node(p).children.contains(&n.id));
            assert_eq!(n.depth, tree.node(p).depth + 1);
            assert!(!n.tokens.is_empty());
        }
        if n.kind == NodeKind::Action {
            let chosen: Vec<u32> = n.steps.iter().map(|s| s.token).collect();
            assert_eq!(chosen, n.tokens, "an action's tokens are the ones the model chose");
            assert!(n.depth <= spec.generation.max_depth);
        }
    }
    if !matches!(spec.policy, PolicySpec::Beam { .. }) {
        assert_eq!(tree.node(NodeId::ROOT).visits as usize, o.stats.rollouts);
    }
    assert!((0.0..=1.0).contains(&o.value), "value {}", o.value);
    // Budgets.
    let b = spec.budget;
    let generated: u64 = tree.nodes.iter().map(|n| n.steps.len() as u64).sum();
    assert_eq!(generated, o.stats.tokens_generated, "every generated token is in the tree");
    assert!(o.stats.tokens_generated <= b.max_generated_tokens.unwrap());
    if let Some(max) = b.max_nodes {
        assert!(o.stats.nodes <= max, "{} nodes > {max}", o.stats.nodes);
    }
    if let Some(max) = b.max_rollouts {
        assert!(o.stats.rollouts <= max, "{} rollouts > {max}", o.stats.rollouts);
    }
    match o.stats.stop_reason {
        StopReason::TokenBudget => assert_eq!(Some(o.stats.tokens_generated), b.max_generated_tokens),
        StopReason::NodeBudget => assert!(b.max_nodes.is_some()),
        StopReason::RolloutBudget => assert_eq!(Some(o.stats.rollouts), b.max_rollouts),
        StopReason::TimeBudget => panic!("no time limit was set"),
        StopReason::Completed => {}
    }
    // Nothing computed twice, nothing leaked.
    assert_eq!(o.stats.tokens_computed, o.stats.distinct_tokens, "recompute ratio {}", o.stats.recompute_ratio());
    assert_eq!(model.counters().live_sequences, 0);
    // The chosen path is a path, and the text is its text.
    assert_eq!(o.path.first(), Some(&NodeId::ROOT));
    for w in o.path.windows(2) {
        assert_eq!(tree.node(w[1]).parent, Some(w[0]));
    }
    assert_eq!(o.text, tree.path_text(*o.path.last().unwrap()));
    // Beam width.
    if let (Some(rounds), PolicySpec::Beam { width, expansions, .. }) = (rounds, &spec.policy) {
        for (i, beam) in rounds.iter().enumerate() {
            assert!(beam.len() <= *width, "round {i}: {} beams > {width}", beam.len());
        }
        for n in &tree.nodes {
            let actions = n.children.iter().filter(|c| tree.node(**c).kind == NodeKind::Action).count();
            assert!(actions <= *expansions, "node {} has {actions} candidates", n.id.0);
        }
        if !spec.reflection {
            // Without reflection every round expands nodes of one depth.
            let max_depth = tree.nodes.iter().map(|n| n.depth).max().unwrap_or(0);
            for d in 0..=max_depth {
                let expanded = tree.nodes.iter().filter(|n| n.depth == d && !n.children.is_empty()).count();
                assert!(expanded <= *width, "depth {d}: {expanded} expanded > {width}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn policies_keep_their_invariants(spec in spec()) {
        let (o, rounds, model) = run(&spec);
        check_invariants(&spec, &o, rounds.as_ref(), &model);
    }

    #[test]
    fn same_seed_same_outcome_and_trace_round_trips(spec in spec()) {
        let (mut a, _, _) = run(&spec);
        let (mut b, _, _) = run(&spec);
        a.stats.elapsed_secs = 0.0;
        b.stats.elapsed_secs = 0.0;
        let json = a.to_json().unwrap();
        prop_assert_eq!(&json, &b.to_json().unwrap());
        prop_assert_eq!(&a, &b);
        let back = SearchOutcome::from_json(&json).unwrap();
        prop_assert_eq!(&back, &a);
        prop_assert_eq!(marco_core::Tree::from_json(&a.tree.to_json().unwrap()).unwrap(), a.tree);
    }
}

#[test]
fn invalid_configurations_are_refused() {
    let bad_config = |r: marco_core::Result<()>| matches!(r, Err(Error::InvalidConfig(_)));
    assert!(bad_config(Mcts::new(MctsConfig::default().with_width(0)).map(|_| ())));
    assert!(bad_config(Mcts::new(MctsConfig::default().with_parallel_leaves(0)).map(|_| ())));
    assert!(bad_config(Mcts::new(MctsConfig::default().with_exploration(f64::NAN)).map(|_| ())));
    assert!(bad_config(Mcts::new(MctsConfig::default().with_reflection(Reflection::new(""))).map(|_| ())));
    assert!(bad_config(BeamSearch::new(BeamConfig::default().with_beam_width(0)).map(|_| ())));
    assert!(bad_config(BeamSearch::new(BeamConfig::default().with_expansions(0)).map(|_| ())));
    assert!(bad_config(SelfConsistency::new(SelfConsistencyConfig::default().with_samples(0)).map(|_| ())));
    assert!(bad_config(
        GreedyReflection::new(GreedyConfig::default().with_generation(GenerationConfig::default().with_max_depth(0)))
            .map(|_| ())
    ));
    // Configurations read from JSON are checked the same way.
    let config: MctsConfig = serde_json::from_str(r#"{"width": 0}"#).unwrap();
    assert!(bad_config(Mcts::new(config).map(|_| ())));
    let config: BeamConfig = serde_json::from_str(r#"{"beam_width": 2, "expansions": 3}"#).unwrap();
    assert_eq!((config.beam_width, config.expansions), (2, 3));
    assert!(BeamSearch::new(config).is_ok());
}

#[test]
fn zero_or_missing_budgets_are_refused() {
    let bad_budget = |r: marco_core::Result<()>| matches!(r, Err(Error::InvalidBudget(_)));
    for budget in
        [Budget::tokens(0), Budget::unlimited(), Budget::tokens(5).with_nodes(0), Budget::tokens(5).with_rollouts(0)]
    {
        assert!(bad_budget(Mcts::new(MctsConfig::default().with_budget(budget)).map(|_| ())));
        assert!(bad_budget(BeamSearch::new(BeamConfig::default().with_budget(budget)).map(|_| ())));
        assert!(bad_budget(GreedyReflection::new(GreedyConfig::default().with_budget(budget)).map(|_| ())));
        assert!(bad_budget(SelfConsistency::new(SelfConsistencyConfig::default().with_budget(budget)).map(|_| ())));
    }
}

#[test]
fn a_prompt_that_fills_the_context_is_an_error_not_a_hang() {
    let mut model = MockModel::builder().max_context(8).build().unwrap();
    let problem = Problem::from_raw(model.tokenizer(), "12345678").unwrap();
    let r = Mcts::default().search(&mut model, &problem);
    assert!(matches!(r, Err(Error::ContextOverflow { .. })), "{r:?}");
    assert_eq!(model.counters().live_sequences, 0);
}

#[test]
fn the_time_budget_stops_a_search() {
    // Each step costs 2 ms; the search may overrun its 30 ms by one step, not by seconds.
    let mut model =
        MockModel::builder().seed(1).typical_length(40).step_cost(Duration::from_millis(2)).build().unwrap();
    let problem = problem(&model);
    let config = MctsConfig::default()
        .with_budget(Budget::unlimited().with_time(Duration::from_millis(30)))
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(4)).with_max_depth(1000));
    let o = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
    assert_eq!(o.stats.stop_reason, StopReason::TimeBudget);
    assert!(o.stats.elapsed_secs >= 0.03);
    assert!(o.stats.elapsed_secs < 2.0, "{}", o.stats.elapsed_secs);
    assert_eq!(o.stats.tokens_computed, o.stats.distinct_tokens);
    assert_eq!(model.counters().live_sequences, 0);
}

#[test]
fn progress_is_reported() {
    #[derive(Default)]
    struct Count(Vec<marco_core::Progress>);
    impl marco_core::SearchObserver for Count {
        fn on_progress(&mut self, p: &marco_core::Progress) {
            self.0.push(*p);
        }
    }
    let mut model = MockModel::builder().seed(3).typical_length(8).build().unwrap();
    let problem = problem(&model);
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(120))
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(3)));
    let mut observer = Count::default();
    let o = Mcts::new(config).unwrap().search_observed(&mut model, &problem, &mut observer).unwrap();
    assert!(!observer.0.is_empty());
    let last = observer.0.last().unwrap();
    assert_eq!(last.tokens_generated, o.stats.tokens_generated);
    assert!(observer.0.windows(2).all(|w| w[0].rollouts <= w[1].rollouts && w[0].nodes <= w[1].nodes));
    assert!(last.best_value > 0.0 && last.best_value <= 1.0);
}

#[test]
fn a_custom_reward_and_extractor_plug_in() {
    /// Rewards paths whose text holds an even number of 'a's.
    struct EvenA;
    impl marco_core::Reward for EvenA {
        fn score(&self, path: &marco_core::PathView<'_>) -> marco_core::Result<f64> {
            Ok(if path.text.matches('a').count().is_multiple_of(2) { 1.0 } else { 0.0 })
        }
        fn name(&self) -> &str {
            "even-a"
        }
    }
    struct Length;
    impl marco_core::AnswerExtractor for Length {
        fn extract(&self, text: &str) -> Option<String> {
            Some(text.len().to_string())
        }
    }
    let mut model = MockModel::builder().seed(5).typical_length(6).build().unwrap();
    let problem = problem(&model);
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(80))
        .with_generation(GenerationConfig::default().with_granularity(Granularity::MiniStep(2)))
        .with_answer_rule(MctsAnswerRule::BestValue);
    let o = Mcts::new(config).unwrap().with_reward(EvenA).with_extractor(Length).search(&mut model, &problem).unwrap();
    assert!(o.policy.contains("even-a"));
    assert_eq!(o.answer, Some(o.text.len().to_string()));
    assert!(o.tree.nodes.iter().all(|n| n.value_sum == n.value_sum.round()));
}

#[test]
fn nothing_is_computed_twice_in_larger_searches() {
    // Thousands of tokens per policy, deep trees, reflections on: every computed token is a
    // distinct token of the final tree.
    let model = || MockModel::builder().seed(11).sharpness(2.0).typical_length(30).build().unwrap();
    let generation = GenerationConfig::default().with_granularity(Granularity::MiniStep(8)).with_temperature(1.0);
    let budget = Budget::tokens(3000);
    let policies: Vec<Box<dyn SearchPolicy>> = vec![
        Box::new(
            Mcts::new(
                MctsConfig::default()
                    .with_budget(budget)
                    .with_generation(generation.clone())
                    .with_reflection(Reflection::default()),
            )
            .unwrap(),
        ),
        Box::new(
            BeamSearch::new(
                BeamConfig::default()
                    .with_budget(budget)
                    .with_generation(generation.clone())
                    .with_beam_width(4)
                    .with_expansions(3)
                    .with_reflection(Reflection::default()),
            )
            .unwrap(),
        ),
        Box::new(
            GreedyReflection::new(
                GreedyConfig::default()
                    .with_budget(budget)
                    .with_generation(generation.clone().with_temperature(0.0))
                    .with_rounds(3),
            )
            .unwrap(),
        ),
        Box::new(
            SelfConsistency::new(
                SelfConsistencyConfig::default()
                    .with_budget(budget)
                    .with_generation(generation.clone())
                    .with_samples(16),
            )
            .unwrap(),
        ),
    ];
    for policy in policies {
        let mut m = model();
        let problem = problem(&m);
        let o = policy.search(&mut m, &problem).unwrap();
        assert!(o.stats.tokens_generated > 20, "{}: {} tokens", o.policy, o.stats.tokens_generated);
        assert_eq!(o.stats.recompute_ratio(), 1.0, "{}", o.policy);
        assert_eq!(m.counters().live_sequences, 0);
    }
}

/// A model that fails on its `fail_at`-th step.
struct Failing {
    inner: MockModel,
    steps: usize,
    fail_at: usize,
}

impl LanguageModel for Failing {
    fn tokenizer(&self) -> &dyn marco_core::Tokenizer {
        self.inner.tokenizer()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn new_sequence(&mut self, prompt: &[u32]) -> marco_core::Result<marco_core::SeqId> {
        self.inner.new_sequence(prompt)
    }
    fn fork(&mut self, seq: marco_core::SeqId) -> marco_core::Result<marco_core::SeqId> {
        self.inner.fork(seq)
    }
    fn append(&mut self, seq: marco_core::SeqId, tokens: &[u32]) -> marco_core::Result<()> {
        self.inner.append(seq, tokens)
    }
    fn step(&mut self, batch: &[marco_core::StepRequest]) -> marco_core::Result<Vec<marco_core::StepOutput>> {
        self.steps += 1;
        if self.steps == self.fail_at {
            return Err(Error::backend(std::io::Error::other("device lost")));
        }
        self.inner.step(batch)
    }
    fn release(&mut self, seq: marco_core::SeqId) -> marco_core::Result<()> {
        self.inner.release(seq)
    }
    fn seq_len(&self, seq: marco_core::SeqId) -> marco_core::Result<usize> {
        self.inner.seq_len(seq)
    }
    fn counters(&self) -> marco_core::ModelCounters {
        self.inner.counters()
    }
}

#[test]
fn a_model_error_is_returned_and_leaks_no_sequence() {
    let generation = GenerationConfig::default().with_granularity(Granularity::MiniStep(3)).with_temperature(1.0);
    let policies: Vec<Box<dyn SearchPolicy>> = vec![
        Box::new(Mcts::new(MctsConfig::default().with_generation(generation.clone()).with_parallel_leaves(3)).unwrap()),
        Box::new(BeamSearch::new(BeamConfig::default().with_generation(generation.clone())).unwrap()),
        Box::new(GreedyReflection::new(GreedyConfig::default().with_generation(generation.clone())).unwrap()),
        Box::new(SelfConsistency::new(SelfConsistencyConfig::default().with_generation(generation)).unwrap()),
    ];
    for policy in policies {
        for fail_at in [1, 2, 5, 17] {
            let inner = MockModel::builder().seed(9).typical_length(20).build().unwrap();
            let mut model = Failing { inner, steps: 0, fail_at };
            let problem = problem(&model.inner);
            let r = policy.search(&mut model, &problem);
            assert!(matches!(r, Err(Error::Backend(_))), "{}: {r:?}", policy.name());
            assert_eq!(model.counters().live_sequences, 0, "{} failing at step {fail_at}", policy.name());
        }
    }
}

/// Found by `policies_keep_their_invariants`: five samples capped at two rollouts, with a
/// one-token budget. The second sample gets no token, so one rollout is made and the token
/// budget, not the rollout budget, is what stopped the search.
#[test]
fn self_consistency_names_the_budget_that_stopped_it() {
    let spec = Spec {
        model: ModelSpec { seed: 0, sharpness: 0.5, typical_length: 3, max_context: 4096 },
        policy: PolicySpec::SelfConsistency { samples: 5 },
        generation: GenerationConfig::default()
            .with_granularity(Granularity::Token)
            .with_sampling(SamplingParams { temperature: 0.0, top_k: 0, top_p: 0.95, seed: 0 })
            .with_max_depth(1)
            .with_distinct_first_tokens(false),
        budget: Budget { max_generated_tokens: Some(1), max_nodes: None, max_rollouts: Some(2), max_time: None },
        reflection: false,
    };
    let (o, rounds, model) = run(&spec);
    assert_eq!(o.stats.rollouts, 1);
    assert_eq!(o.stats.stop_reason, StopReason::TokenBudget);
    check_invariants(&spec, &o, rounds.as_ref(), &model);
}

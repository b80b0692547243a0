//! A mock model on which greedy decoding is wrong and searching is right.
//!
//! After the prompt the model prefers "Try A:" (p = 0.6) over "Try B:" (p = 0.4). The A
//! branch continues unconfidently (three numbers of about equal probability) to the wrong
//! answer 7; the B branch continues confidently to the right answer 42. After the reflection
//! prompt the model confidently takes the B branch. So greedy decoding answers 7, and every
//! policy that searches — or reflects — answers 42.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use marco_core::mock::{MockModel, Rule, EOS};
use marco_core::{Budget, Granularity, LanguageModel, Problem, SearchOutcome, SearchPolicy};
use marco_search::{
    BeamConfig, BeamSearch, GenerationConfig, GreedyAnswerRule, GreedyConfig, GreedyReflection, Mcts, MctsAnswerRule,
    MctsConfig, Reflection, SelfConsistency, SelfConsistencyConfig, MARCO_REFLECTION,
};

fn scenario(seed: u64) -> (MockModel, Problem) {
    scenario_with(seed, 0.6)
}

/// The scenario with "Try A:" at probability `p_a` and "Try B:" at `1 - p_a`.
fn scenario_with(seed: u64, p_a: f64) -> (MockModel, Problem) {
    let model = MockModel::builder()
        .seed(seed)
        .pieces(["Try A:", "Try B:", " 7", " 8", " 6", " 42"])
        .rule(Rule::ends_with("scratch.").probs([("Try B:", 0.9)]))
        .rule(Rule::ends_with("Try A:").probs([(" 7", 0.35), (" 8", 0.3), (" 6", 0.3)]))
        .rule(Rule::ends_with("Try B:").probs([(" 42", 0.95)]))
        .rule(Rule::ends_with(" 42").probs([(EOS, 0.97)]))
        .rule(Rule::ends_with(" 7").probs([(EOS, 0.55), ("?", 0.4)]))
        .rule(Rule::ends_with(" 8").probs([(EOS, 0.55), ("?", 0.4)]))
        .rule(Rule::ends_with(" 6").probs([(EOS, 0.55), ("?", 0.4)]))
        .rule(Rule::ends_with("?").probs([(EOS, 0.9)]))
        .rule(Rule::ends_with("assistant: ").probs([("Try A:", p_a), ("Try B:", 1.0 - p_a)]))
        .build()
        .unwrap();
    let problem = Problem::from_question(model.tokenizer(), "What is six times seven?", None).unwrap();
    (model, problem)
}

fn generation(seed: u64) -> GenerationConfig {
    GenerationConfig::default()
        .with_granularity(Granularity::Token)
        .with_max_depth(16)
        .with_seed(seed)
        .with_temperature(1.0)
}

fn summary(o: &SearchOutcome) -> String {
    format!(
        "{}: answer {:?} value {:.3} text {:?} nodes {} rollouts {} generated {} ratio {:.3}",
        o.policy,
        o.answer,
        o.value,
        o.text,
        o.stats.nodes,
        o.stats.rollouts,
        o.stats.tokens_generated,
        o.stats.recompute_ratio()
    )
}

#[test]
fn greedy_is_wrong() {
    let (mut model, problem) = scenario(0);
    let config = GreedyConfig::default().with_rounds(0).with_generation(generation(0).with_temperature(0.0));
    let o = GreedyReflection::new(config).unwrap().search(&mut model, &problem).unwrap();
    println!("{}", summary(&o));
    assert_eq!(o.answer.as_deref(), Some("7"));
    assert_eq!(o.text, "Try A: 7");
}

#[test]
fn greedy_with_reflection_is_right() {
    for rule in [GreedyAnswerRule::LastRound, GreedyAnswerRule::MostConfident] {
        let (mut model, problem) = scenario(0);
        let config = GreedyConfig::default()
            .with_generation(generation(0).with_temperature(0.0))
            .with_rounds(1)
            .with_answer_rule(rule);
        let o = GreedyReflection::new(config).unwrap().search(&mut model, &problem).unwrap();
        println!("{}", summary(&o));
        assert_eq!(o.answer.as_deref(), Some("42"), "{rule:?}");
        assert!(o.text.starts_with("Try A: 7Wait! Maybe I made some mistakes!"), "{}", o.text);
        assert_eq!(o.stats.rollouts, 2);
        assert_eq!(o.stats.recompute_ratio(), 1.0);
    }
}

#[test]
fn mcts_is_right() {
    for (seed, leaves) in (0..8).flat_map(|s| [(s, 1), (s, 3)]) {
        for rule in [MctsAnswerRule::MostVisited, MctsAnswerRule::BestValue, MctsAnswerRule::Vote] {
            let (mut model, problem) = scenario(seed);
            let config = MctsConfig::default()
                .with_parallel_leaves(leaves)
                .with_budget(Budget::tokens(400).with_rollouts(24))
                .with_generation(generation(seed))
                .with_width(2)
                .with_answer_rule(rule);
            let o = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
            println!("seed {seed}: {}", summary(&o));
            assert_eq!(o.answer.as_deref(), Some("42"), "seed {seed} {rule:?}");
            assert_eq!(o.stats.recompute_ratio(), 1.0);
        }
    }
}

#[test]
fn beam_is_right() {
    for seed in 0..8 {
        let (mut model, problem) = scenario(seed);
        let config = BeamConfig::default()
            .with_budget(Budget::tokens(400))
            .with_generation(generation(seed))
            .with_beam_width(2)
            .with_expansions(2);
        let o = BeamSearch::new(config).unwrap().search(&mut model, &problem).unwrap();
        println!("seed {seed}: {}", summary(&o));
        assert_eq!(o.answer.as_deref(), Some("42"), "seed {seed}");
        assert_eq!(o.stats.recompute_ratio(), 1.0);
    }
}

#[test]
fn self_consistency_votes() {
    let (mut model, problem) = scenario(3);
    let config = SelfConsistencyConfig::default()
        .with_budget(Budget::tokens(400))
        .with_generation(generation(3))
        .with_samples(6);
    let o = SelfConsistency::new(config).unwrap().search(&mut model, &problem).unwrap();
    println!("{}", summary(&o));
    assert_eq!(o.stats.rollouts, 6);
    assert!(o.answer.is_some());
    assert_eq!(o.stats.recompute_ratio(), 1.0);
}

#[test]
fn mcts_reflection_recovers_from_a_single_wrong_chain() {
    // Width 1 with greedy sampling: MCTS alone can only find the greedy chain, so the right
    // answer must come from a reflection child of the finished thought.
    let (mut model, problem) = scenario(0);
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(200).with_rollouts(10))
        .with_generation(generation(0).with_temperature(0.0))
        .with_width(1)
        .with_reflection(marco_search::Reflection::default());
    let o = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
    println!("{}", summary(&o));
    assert_eq!(o.answer.as_deref(), Some("42"));
    assert!(o.path.iter().any(|&n| o.tree.node(n).kind == marco_core::NodeKind::Reflection));
    assert_eq!(o.stats.recompute_ratio(), 1.0);
    // Without reflection the same search is stuck with the greedy answer.
    let (mut model, problem) = scenario(0);
    let config = MctsConfig::default()
        .with_budget(Budget::tokens(200).with_rollouts(10))
        .with_generation(generation(0).with_temperature(0.0))
        .with_width(1);
    let o = Mcts::new(config).unwrap().search(&mut model, &problem).unwrap();
    assert_eq!(o.answer.as_deref(), Some("7"));
}

#[test]
fn beam_reflection_continues_finished_thoughts() {
    let (mut model, problem) = scenario(0);
    let config = BeamConfig::default()
        .with_budget(Budget::tokens(200))
        .with_generation(generation(0).with_temperature(0.0).with_distinct_first_tokens(false))
        .with_beam_width(1)
        .with_expansions(1)
        .with_reflection(marco_search::Reflection::default());
    let o = BeamSearch::new(config).unwrap().search(&mut model, &problem).unwrap();
    println!("{}", summary(&o));
    assert_eq!(o.answer.as_deref(), Some("42"));
    assert!(o.tree.nodes.iter().any(|n| n.kind == marco_core::NodeKind::Reflection));
}

#[test]
fn search_finds_a_less_likely_first_step() {
    // The better first step gets rarer; the search still finds it at default settings
    // (temperature 0.7, width 3, distinct first tokens) within a small budget.
    for p_a in [0.55, 0.7, 0.8, 0.9] {
        for seed in 0..4 {
            let (mut model, problem) = scenario_with(seed, p_a);
            let generation = GenerationConfig::default().with_granularity(Granularity::Token).with_seed(seed);
            let mcts = MctsConfig::default().with_budget(Budget::tokens(300)).with_generation(generation.clone());
            let o = Mcts::new(mcts).unwrap().search(&mut model, &problem).unwrap();
            assert_eq!(o.answer.as_deref(), Some("42"), "mcts p_a {p_a} seed {seed}: {}", summary(&o));
            let (mut model, problem) = scenario_with(seed, p_a);
            let beam = BeamConfig::default().with_budget(Budget::tokens(300)).with_generation(generation);
            let o = BeamSearch::new(beam).unwrap().search(&mut model, &problem).unwrap();
            assert_eq!(o.answer.as_deref(), Some("42"), "beam p_a {p_a} seed {seed}: {}", summary(&o));
        }
    }
}

#[test]
fn line_steps_and_output_tags() {
    use marco_core::mock::Condition;
    let when_after = |plan: &str| {
        Rule::when(Condition::All(vec![
            Condition::Contains(plan.into()),
            Condition::EndsWith("\n".into()),
            Condition::Not(Box::new(Condition::Contains("<Output>".into()))),
        ]))
    };
    let build = || {
        let model = MockModel::builder()
            .pieces(["Plan A", "Plan B", "<Output>7</Output>", "<Output>8</Output>", "<Output>42</Output>"])
            .rule(Rule::ends_with("assistant: ").probs([("Plan A", 0.6), ("Plan B", 0.4)]))
            .rule(Rule::ends_with("Plan A").probs([("\n", 0.9)]))
            .rule(Rule::ends_with("Plan B").probs([("\n", 0.9)]))
            .rule(when_after("Plan A").probs([("<Output>7</Output>", 0.35), ("<Output>8</Output>", 0.3)]))
            .rule(when_after("Plan B").probs([("<Output>42</Output>", 0.95)]))
            .rule(Rule::ends_with("</Output>").probs([(EOS, 0.97)]))
            .build()
            .unwrap();
        let problem = Problem::from_question(model.tokenizer(), "What is six times seven?", None).unwrap();
        (model, problem)
    };
    let generation = GenerationConfig::default().with_granularity(Granularity::line());
    let (mut model, problem) = build();
    let greedy = GreedyConfig::default()
        .with_rounds(0)
        .with_budget(Budget::tokens(100))
        .with_generation(generation.clone().with_temperature(0.0));
    let o = GreedyReflection::new(greedy).unwrap().search(&mut model, &problem).unwrap();
    assert_eq!(o.answer.as_deref(), Some("7"), "{}", summary(&o));
    assert_eq!(o.path.len(), 3, "two line steps: {}", summary(&o));
    let (mut model, problem) = build();
    let mcts = MctsConfig::default().with_budget(Budget::tokens(200)).with_generation(generation.clone());
    let o = Mcts::new(mcts).unwrap().search(&mut model, &problem).unwrap();
    assert_eq!(o.answer.as_deref(), Some("42"), "{}", summary(&o));
    assert_eq!(o.text, "Plan B\n<Output>42</Output>");
    let (mut model, problem) = build();
    let beam = BeamConfig::default().with_budget(Budget::tokens(200)).with_generation(generation);
    let o = BeamSearch::new(beam).unwrap().search(&mut model, &problem).unwrap();
    assert_eq!(o.answer.as_deref(), Some("42"), "{}", summary(&o));
}

#[test]
fn chat_turn_reflection_is_rendered_by_the_template() {
    let (mut model, problem) = scenario(0);
    let config = GreedyConfig::default()
        .with_generation(generation(0).with_temperature(0.0))
        .with_rounds(1)
        .with_reflection(Reflection::default().as_chat_turn());
    let o = GreedyReflection::new(config).unwrap().search(&mut model, &problem).unwrap();
    let reflection = o.tree.nodes.iter().find(|n| n.kind == marco_core::NodeKind::Reflection).unwrap();
    // The mock's template writes `role: content\n` lines and opens the answer with `assistant: `.
    assert_eq!(reflection.text, format!("\nuser: {MARCO_REFLECTION}\nassistant: "));
    assert_eq!(o.stats.recompute_ratio(), 1.0);
}

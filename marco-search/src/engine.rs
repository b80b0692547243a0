//! The machinery every policy shares: one search's tree, model states, budget and batched
//! generation.
//!
//! # Nothing is computed twice
//! Every token the model computes ends up in a node of the tree, and no prefix is ever fed
//! again, so `tokens computed ÷ distinct tokens in the tree` is 1 on a model that counts
//! honestly:
//! - the prompt is fed once ([`LanguageModel::new_sequence`]) and held by the root;
//! - a node that may still grow children keeps a live model state (a [`SeqId`]) that ends
//!   with its last token; children start from [`LanguageModel::fork`]s of it, and the last
//!   child to be created takes the parent's own state over, so a fully expanded node holds
//!   none (this keeps the number of live states bounded by the frontier);
//! - rollouts are *materialised*: each action of a rollout becomes a node, keeping a state of
//!   its own if the policy may expand it later, so a later expansion reuses its tokens;
//! - an action cut short by the budget still becomes a (non-terminal) node;
//! - a reflection is fed with [`LanguageModel::append`] and held by a
//!   [`NodeKind::Reflection`] node.
//!
//! # Batched generation
//! [`Engine::walk`] advances a set of [`Walker`]s — actions in progress, each on its own
//! state — with one batched [`LanguageModel::step`] per token. In rollout mode a walker that
//! finishes a non-terminal action starts the next one at once, so rollouts of several
//! children advance together and no sequence waits for a slower sibling's action to end.
//! A model that [generates whole actions](LanguageModel::generates_whole_actions) (a server)
//! gets one [`LanguageModel::extend`] per round instead, each walker's whole action at once.
//!
//! # Replay
//! Every walker samples from its own random stream, keyed by the search's seed and the place
//! of its action in the tree (the path of child ordinals from the root), never by a model
//! handle or a node's arena index. A search is therefore a function of the model, the
//! problem, the configuration and the seed: the same in a fresh process, after other
//! searches, and whether the model is driven token by token or action by action.
//!
//! # Budgets
//! A walker holds one node reservation for its action in progress and a policy never starts
//! more walkers than the node budget has room for; a step never advances more sequences
//! than tokens are left; time is checked before every step. A budget that runs out mid-action
//! ends every walker; partial actions become nodes.

use marco_core::sampling::{splitmix64, uniform};
use marco_core::{
    ActionGranularity, AnswerExtractor, Budget, BudgetTracker, ConfidenceReward, Error, ExtendRequest, LanguageModel,
    ModelCounters, NodeId, NodeKind, PathView, Problem, Result, Reward, SearchOutcome, SearchStats, SeqId, StepOutput,
    StepRequest, StopReason, TokenId, TokenLogprob, Tree,
};

use crate::config::{GenerationConfig, Reflection, ReflectionPlacement};

/// How an action in progress ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionEnd {
    Open,
    /// The granularity says the action is complete.
    Complete,
    /// A stop token.
    Stop,
    /// The context window is full.
    Context,
    /// A budget ran out.
    Budget,
}

/// An action in progress on its own model state.
#[derive(Debug)]
pub(crate) struct Walker {
    /// Node the current action hangs under.
    parent: NodeId,
    seq: SeqId,
    seq_len: usize,
    /// Sibling group for distinct first tokens (index into the engine's groups).
    group: Option<usize>,
    /// Key of the current action's random stream (see the module's Replay section).
    key: u64,
    tokens: Vec<TokenId>,
    steps: Vec<StepOutput>,
    end: ActionEnd,
    done: bool,
    /// Last node this walker committed.
    pub last: Option<NodeId>,
}

/// Siblings created from one state: its top candidates and the first tokens already taken.
#[derive(Debug)]
struct SiblingGroup {
    top: Option<Vec<TokenLogprob>>,
    used: Vec<TokenId>,
    leader_started: bool,
    key: u64,
}

/// Generation mode of [`Engine::walk`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct WalkMode {
    /// Continue each walker to a terminal state (one action per walker otherwise).
    pub rollout: bool,
    /// Give every non-terminal node of a rollout a state of its own (a fork), so a policy
    /// can expand it later.
    pub keep_states: bool,
}

/// One search in progress.
pub(crate) struct Engine<'a> {
    model: &'a mut dyn LanguageModel,
    pub tree: Tree,
    pub tracker: BudgetTracker,
    /// Live model state at the end of each node, if any.
    seqs: Vec<Option<SeqId>>,
    /// States held by walkers (not by nodes), so that an error mid-search leaks none.
    in_flight: Vec<SeqId>,
    /// Value of the last evaluation that ended at each node.
    pub values: Vec<Option<f64>>,
    /// Random-stream key of each node's action.
    keys: Vec<u64>,
    /// Actions started under each node so far (the next child's ordinal).
    spawned: Vec<u64>,
    generation: GenerationConfig,
    granularity: &'a dyn ActionGranularity,
    reward: &'a dyn Reward,
    /// The limit that ended the search, once one has.
    pub stop: Option<StopReason>,
    start_counters: ModelCounters,
    prompt_text: String,
    max_context: usize,
    groups: Vec<SiblingGroup>,
    confidence: ConfidenceReward,
    /// Best value seen so far, for progress reports.
    pub best_value: f64,
}

impl<'a> Engine<'a> {
    /// Starts a search: validates the budget, feeds the prompt.
    pub fn start(
        model: &'a mut dyn LanguageModel,
        problem: &Problem,
        budget: Budget,
        generation: &GenerationConfig,
        granularity: &'a dyn ActionGranularity,
        reward: &'a dyn Reward,
    ) -> Result<Self> {
        let tracker = BudgetTracker::start(budget)?;
        generation.validate()?;
        if problem.prompt_tokens.is_empty() {
            return Err(Error::EmptyInput("the prompt has no tokens".into()));
        }
        let max_context = model.max_context();
        if problem.prompt_tokens.len() >= max_context {
            return Err(Error::ContextOverflow { needed: problem.prompt_tokens.len() + 1, limit: max_context });
        }
        let start_counters = model.counters();
        let root_seq = model.new_sequence(&problem.prompt_tokens)?;
        Ok(Engine {
            model,
            tree: Tree::new(problem.prompt_tokens.clone(), problem.prompt_text.clone()),
            tracker,
            seqs: vec![Some(root_seq)],
            in_flight: Vec::new(),
            values: vec![None],
            keys: vec![splitmix64(generation.sampling.seed ^ ROOT_KEY)],
            spawned: vec![0],
            generation: generation.clone(),
            granularity,
            reward,
            stop: None,
            start_counters,
            prompt_text: problem.prompt_text.clone(),
            max_context,
            groups: Vec::new(),
            confidence: ConfidenceReward::default(),
            best_value: f64::NEG_INFINITY,
        })
    }

    /// The model's tokenizer decodes `tokens` (special tokens left out).
    fn decode(&self, tokens: &[TokenId]) -> Result<String> {
        self.model.tokenizer().decode(tokens, true)
    }

    /// The text of `node`'s edge, such that the texts along any path concatenate to the
    /// decoded path. Decoding each edge alone would split a character whose bytes straddle two
    /// edges (byte-level BPE: most CJK characters take two or three tokens) into two U+FFFD.
    /// So the generated path is decoded whole and the ancestors' texts are cut off its front;
    /// an incomplete character at the end (trailing U+FFFD) is left to the child that
    /// completes it, except at a terminal node. Where a tokenizer's decoding is not
    /// prefix-stable, the edge is decoded alone, as before.
    fn path_aligned_text(&self, node: NodeId, terminal: bool) -> Result<String> {
        let path = self.tree.path(node);
        let generated: Vec<TokenId> =
            path.iter().skip(1).flat_map(|&n| self.tree.node(n).tokens.iter().copied()).collect();
        let full = self.decode(&generated)?;
        let full = if terminal { full.as_str() } else { full.trim_end_matches('\u{FFFD}') };
        let before: String = path[1..path.len() - 1].iter().map(|&n| self.tree.node(n).text.as_str()).collect();
        match full.strip_prefix(before.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => self.decode(&self.tree.node(node).tokens),
        }
    }

    /// The random-stream key of the next action started under `parent`.
    fn next_child_key(&mut self, parent: NodeId) -> u64 {
        let i = parent.index();
        let ordinal = self.spawned[i];
        self.spawned[i] += 1;
        splitmix64(self.keys[i] ^ splitmix64(ordinal.wrapping_add(1)))
    }

    /// Records the first limit that ended the search.
    pub fn stop_with(&mut self, reason: StopReason) {
        self.stop.get_or_insert(reason);
    }

    /// Checks the budget before a new round of work; records and returns the limit reached.
    pub fn out_of_budget(&mut self) -> bool {
        if self.stop.is_some() {
            return true;
        }
        match self.tracker.exhausted(self.tree.len()) {
            Some(reason) => {
                self.stop_with(reason);
                true
            }
            None => false,
        }
    }

    /// Nodes that may still be added.
    pub fn nodes_left(&self) -> usize {
        self.tracker.nodes_left(self.tree.len())
    }

    /// Rollouts that may still be started.
    pub fn rollouts_left(&self) -> usize {
        self.tracker.budget().max_rollouts.map_or(usize::MAX, |m| m.saturating_sub(self.tracker.rollouts))
    }

    /// Whether `node` holds a live model state.
    pub fn has_state(&self, node: NodeId) -> bool {
        self.seqs.get(node.index()).is_some_and(Option::is_some)
    }

    /// Frees the state of `node`, if it holds one.
    pub fn release_state(&mut self, node: NodeId) -> Result<()> {
        if let Some(seq) = self.seqs.get_mut(node.index()).and_then(Option::take) {
            self.model.release(seq)?;
        }
        Ok(())
    }

    /// A walker under `parent`: on a fork of its state, or on the state itself with `take`
    /// (the parent then holds none).
    pub fn walker(&mut self, parent: NodeId, take: bool, group: Option<usize>) -> Result<Walker> {
        let own = self
            .seqs
            .get(parent.index())
            .copied()
            .flatten()
            .ok_or_else(|| Error::Internal(format!("node {} holds no model state to continue from", parent.0)))?;
        let seq = if take {
            self.seqs[parent.index()] = None;
            own
        } else {
            self.model.fork(own)?
        };
        self.in_flight.push(seq);
        let seq_len = self.model.seq_len(seq)?;
        let key = self.next_child_key(parent);
        Ok(Walker {
            parent,
            seq,
            seq_len,
            group,
            key,
            tokens: Vec::new(),
            steps: Vec::new(),
            end: ActionEnd::Open,
            done: false,
            last: None,
        })
    }

    /// A sibling group for children of `parent` with distinct first tokens, or `None` when
    /// the configuration turns that off. Existing action children of `parent` tell the
    /// group the state's top candidates and which first tokens are taken.
    pub fn sibling_group(&mut self, parent: NodeId) -> Option<usize> {
        if !self.generation.distinct_first_tokens {
            return None;
        }
        let mut top = None;
        let mut used = Vec::new();
        for &child in &self.tree.node(parent).children {
            let node = self.tree.node(child);
            if let Some(first) = node.steps.first() {
                if top.is_none() {
                    top = Some(first.top.clone());
                }
                used.push(first.token);
            }
        }
        let key = self.keys[parent.index()];
        self.groups.push(SiblingGroup { top, used, leader_started: false, key });
        Some(self.groups.len() - 1)
    }

    /// A first token for the next sibling of `group`, drawn without replacement from the
    /// state's top candidates at the sampling temperature; `None` once no candidate is left.
    fn distinct_first_token(&mut self, group: usize) -> Option<TokenId> {
        let sampling = self.generation.sampling;
        let min_ratio = self.generation.distinct_min_ratio as f64;
        let g = &mut self.groups[group];
        let top = g.top.as_ref()?;
        let best = top.first()?.logprob as f64;
        let candidates: Vec<&TokenLogprob> =
            top.iter().filter(|t| !g.used.contains(&t.token) && (t.logprob as f64 - best).exp() >= min_ratio).collect();
        let chosen = if candidates.is_empty() {
            return None;
        } else if sampling.is_greedy() {
            candidates[0].token
        } else {
            let inv_t = 1.0 / sampling.temperature as f64;
            let weights: Vec<f64> = candidates.iter().map(|t| ((t.logprob as f64 - best) * inv_t).exp()).collect();
            let total: f64 = weights.iter().sum();
            let target = uniform(sampling.seed, g.key, g.used.len() as u64) * total;
            let mut acc = 0.0;
            let mut chosen = candidates[candidates.len() - 1].token;
            for (c, w) in candidates.iter().zip(&weights) {
                acc += w;
                if target < acc {
                    chosen = c.token;
                    break;
                }
            }
            chosen
        };
        g.used.push(chosen);
        Some(chosen)
    }

    /// Whether a time or token limit forbids another step; records it.
    fn step_forbidden(&mut self) -> bool {
        if self.tracker.tokens_left() == 0 {
            self.stop_with(StopReason::TokenBudget);
            return true;
        }
        if self.tracker.budget().max_time.is_some_and(|m| self.tracker.elapsed() >= m) {
            self.stop_with(StopReason::TimeBudget);
            return true;
        }
        false
    }

    /// Advances `walkers` together, one batched step per token, until each has finished its
    /// action (or, in rollout mode, its rollout) or a budget ends them all.
    pub fn walk(&mut self, walkers: &mut [Walker], mode: WalkMode) -> Result<()> {
        let whole_actions = self.model.generates_whole_actions();
        // The longest action the granularity allows (whole-action rounds reserve this much).
        let hint = self.granularity.hints().and_then(|h| h.max_tokens).unwrap_or(usize::MAX).max(1);
        loop {
            if walkers.iter().all(|w| w.done) {
                return Ok(());
            }
            if self.step_forbidden() {
                for w in walkers.iter_mut().filter(|w| !w.done) {
                    w.end = ActionEnd::Budget;
                    self.commit(w, mode, 0)?;
                }
                return Ok(());
            }
            // Who advances this round: token steps give each open walker one token of the
            // budget; whole actions reserve each one's share in walker order, so a round never
            // generates past the budget.
            let mut tokens_left = self.tracker.tokens_left();
            let mut members = Vec::new();
            for (i, w) in walkers.iter().enumerate() {
                if tokens_left == 0 {
                    break;
                }
                if w.done {
                    continue;
                }
                let Some(force) = self.first_token(w) else { continue };
                let share = if whole_actions {
                    let room = self.max_context.saturating_sub(w.seq_len);
                    let share = (tokens_left.min(usize::MAX as u64) as usize).min(hint).min(room);
                    if share == 0 {
                        continue;
                    }
                    share
                } else {
                    1
                };
                tokens_left -= share as u64;
                members.push((i, force, share));
            }
            if members.is_empty() {
                return Err(Error::Internal("no walker could advance".into()));
            }
            let open_after: usize = walkers.iter().filter(|w| !w.done).count();
            if whole_actions {
                self.extend_round(walkers, &members, hint)?;
            } else {
                self.step_round(walkers, &members)?;
            }
            // Walkers other than the one committing each hold one node reservation.
            let mut open = open_after;
            for &(i, _, _) in &members {
                if walkers[i].end != ActionEnd::Open {
                    open -= 1;
                    self.commit(&mut walkers[i], mode, open)?;
                    if !walkers[i].done {
                        open += 1;
                    }
                }
            }
        }
    }

    /// Whether `w` may advance now and with which forced first token: `None` while it waits for
    /// its sibling group's leader to reveal the state's candidates; `Some(force)` otherwise.
    fn first_token(&mut self, w: &Walker) -> Option<Option<TokenId>> {
        let Some(g) = w.group.filter(|_| w.tokens.is_empty()) else { return Some(None) };
        if self.groups[g].top.is_some() {
            Some(self.distinct_first_token(g))
        } else if self.groups[g].leader_started {
            None
        } else {
            self.groups[g].leader_started = true;
            Some(None)
        }
    }

    /// Records the first token of a walker's action in its sibling group.
    fn note_first_token(&mut self, w: &Walker, first: &StepOutput) {
        if let Some(g) = w.group.filter(|_| w.tokens.is_empty()) {
            let group = &mut self.groups[g];
            if group.top.is_none() {
                group.top = Some(first.top.clone());
            }
            if !group.used.contains(&first.token) {
                group.used.push(first.token);
            }
        }
    }

    /// One batched [`LanguageModel::step`]: a token for each member.
    fn step_round(&mut self, walkers: &mut [Walker], members: &[(usize, Option<TokenId>, usize)]) -> Result<()> {
        let requests: Vec<StepRequest> = members
            .iter()
            .map(|&(i, force, _)| {
                let mut request = StepRequest::new(walkers[i].seq, self.generation.sampling);
                request.force = force;
                request.top_logprobs = self.generation.top_logprobs;
                request.stream = Some(walkers[i].key);
                request
            })
            .collect();
        let outputs = self.model.step(&requests)?;
        check_answer_count(outputs.len(), requests.len(), "step")?;
        self.tracker.generated_tokens += outputs.len() as u64;
        for (&(i, _, _), output) in members.iter().zip(outputs) {
            let w = &mut walkers[i];
            self.note_first_token(w, &output);
            w.tokens.push(output.token);
            w.steps.push(output);
            w.seq_len += 1;
            let end = marco_core::action_end(
                self.model.tokenizer(),
                self.granularity,
                &w.tokens,
                w.seq_len,
                self.max_context,
                usize::MAX,
            )?;
            w.end = end.map_or(ActionEnd::Open, ActionEnd::from);
        }
        Ok(())
    }

    /// One [`LanguageModel::extend`]: a whole action for each member, within its share.
    fn extend_round(
        &mut self,
        walkers: &mut [Walker],
        members: &[(usize, Option<TokenId>, usize)],
        hint: usize,
    ) -> Result<()> {
        let requests: Vec<ExtendRequest> = members
            .iter()
            .map(|&(i, force, share)| {
                let mut request = ExtendRequest::new(walkers[i].seq, self.generation.sampling, share);
                request.force_first = force;
                request.top_logprobs = self.generation.top_logprobs;
                request.stream = Some(walkers[i].key);
                request
            })
            .collect();
        let outputs = self.model.extend(&requests, self.granularity)?;
        check_answer_count(outputs.len(), requests.len(), "extend")?;
        for (&(i, _, share), output) in members.iter().zip(outputs) {
            let w = &mut walkers[i];
            if output.steps.len() > share {
                return Err(Error::backend(std::io::Error::other(format!(
                    "the model added {} tokens to an action limited to {share}",
                    output.steps.len()
                ))));
            }
            self.tracker.generated_tokens += output.steps.len() as u64;
            if let Some(first) = output.steps.first() {
                self.note_first_token(w, first);
            }
            let capped = share < hint.min(self.max_context.saturating_sub(w.seq_len));
            w.seq_len += output.steps.len();
            w.tokens.extend(output.steps.iter().map(|s| s.token));
            w.steps.extend(output.steps);
            w.end = match output.end {
                // A budget's share ends an action as the budget does; the granularity's own cap
                // ends it like its completion.
                marco_core::ActionEnd::Length if capped => ActionEnd::Budget,
                end => ActionEnd::from(end),
            };
        }
        Ok(())
    }

    /// Turns a walker's action into a node; in rollout mode starts its next action if the
    /// node is not terminal and the node budget has room beside the `others` in flight.
    fn commit(&mut self, w: &mut Walker, mode: WalkMode, others: usize) -> Result<()> {
        if w.tokens.is_empty() {
            // Nothing was computed on this state: it leaves no trace.
            self.land(w.seq);
            self.model.release(w.seq)?;
            w.done = true;
            return Ok(());
        }
        let tokens = std::mem::take(&mut w.tokens);
        let steps = std::mem::take(&mut w.steps);
        let confidence = self.confidence.mean_confidence(&steps)?;
        let node = self.tree.add_child(w.parent, NodeKind::Action, tokens, steps, String::new());
        let terminal = matches!(w.end, ActionEnd::Stop | ActionEnd::Context)
            || w.seq_len >= self.max_context
            || self.tree.node(node).depth >= self.generation.max_depth;
        let text = self.path_aligned_text(node, terminal)?;
        {
            let n = self.tree.node_mut(node);
            n.confidence = confidence;
            n.terminal = terminal;
            n.text = text;
        }
        self.seqs.push(None);
        self.values.push(None);
        self.keys.push(w.key);
        self.spawned.push(0);
        w.last = Some(node);
        let wants_more = mode.rollout && !terminal && w.end == ActionEnd::Complete && self.stop.is_none();
        if wants_more && self.nodes_left() <= others {
            // The rollout is cut short for want of nodes: the node budget ends the search.
            self.stop_with(StopReason::NodeBudget);
        }
        let continues = wants_more && self.nodes_left() > others;
        if continues {
            if mode.keep_states {
                let next = self.model.fork(w.seq)?;
                self.in_flight.push(next);
                self.land(w.seq);
                self.seqs[node.index()] = Some(w.seq);
                w.seq = next;
            }
            w.parent = node;
            w.group = None;
            w.key = self.next_child_key(node);
            w.end = ActionEnd::Open;
        } else {
            self.land(w.seq);
            self.seqs[node.index()] = Some(w.seq);
            w.done = true;
        }
        Ok(())
    }

    /// `seq` is no longer a walker's: a node holds it, or it is released.
    fn land(&mut self, seq: SeqId) {
        if let Some(i) = self.in_flight.iter().rposition(|&s| s == seq) {
            self.in_flight.swap_remove(i);
        }
    }

    /// Reflections on the path from the root to `node`.
    fn reflections_on_path(&self, node: NodeId) -> u32 {
        self.tree.path(node).into_iter().filter(|&n| self.tree.node(n).kind == NodeKind::Reflection).count() as u32
    }

    /// Whether `node` finished a thought (ended at a stop token) and may take a reflection
    /// child: it has no child yet, holds its state, the path has reflections to spare, and
    /// depth and context leave room for at least one action after the prompt.
    pub fn can_reflect(&self, node: NodeId, reflection: Option<&Reflection>, reflection_len: usize) -> bool {
        let Some(reflection) = reflection else { return false };
        let n = self.tree.node(node);
        let ended_at_stop = n.tokens.last().is_some_and(|&t| self.model.tokenizer().is_stop(t));
        n.kind == NodeKind::Action
            && n.terminal
            && ended_at_stop
            && n.children.is_empty()
            && self.has_state(node)
            && n.depth + 2 <= self.generation.max_depth
            && self.reflections_on_path(node) < reflection.max_per_path
            && self.state_len(node).saturating_add(reflection_len) < self.max_context
    }

    /// Tokens in the state of `node`; `usize::MAX` when it holds none.
    fn state_len(&self, node: NodeId) -> usize {
        self.seqs.get(node.index()).copied().flatten().and_then(|s| self.model.seq_len(s).ok()).unwrap_or(usize::MAX)
    }

    /// Tokens of a reflection text: the text itself (special tokens not parsed), or the chat
    /// turn that carries it (special tokens parsed).
    pub fn reflection_tokens(&self, reflection: Option<&Reflection>) -> Result<Vec<TokenId>> {
        match reflection {
            Some(r) => {
                let tokenizer = self.model.tokenizer();
                let tokens = match r.placement {
                    ReflectionPlacement::AfterStop => tokenizer.encode(&r.text, false)?,
                    ReflectionPlacement::ChatTurn => match chat_turn_text(tokenizer, &r.text) {
                        Some(turn) => tokenizer.encode(&turn, true)?,
                        None => tokenizer.encode(&r.text, false)?,
                    },
                };
                if tokens.is_empty() {
                    return Err(Error::InvalidConfig("the reflection text encodes to no tokens".into()));
                }
                Ok(tokens)
            }
            None => Ok(Vec::new()),
        }
    }

    /// Appends a reflection child to `node` (which must pass [`Engine::can_reflect`]); the
    /// node's state moves to the child. Takes one node of the budget.
    ///
    /// The stop token that ended `node` stays in the context before the reflection: the model
    /// has already consumed it when the step returned it, and undoing that would mean feeding
    /// the thought again (or forking before every token). The mock and Marco-style prompts
    /// read fine this way; the reflection text can start with a separator if a model needs one.
    pub fn reflect(&mut self, node: NodeId, tokens: &[TokenId]) -> Result<NodeId> {
        let seq = self.seqs[node.index()]
            .take()
            .ok_or_else(|| Error::Internal(format!("node {} holds no state to reflect on", node.0)))?;
        self.model.append(seq, tokens)?;
        let child = self.tree.add_child(node, NodeKind::Reflection, tokens.to_vec(), Vec::new(), String::new());
        let text = self.path_aligned_text(child, false)?;
        self.tree.node_mut(child).text = text;
        self.seqs.push(Some(seq));
        self.values.push(None);
        let key = self.next_child_key(node);
        self.keys.push(key);
        self.spawned.push(0);
        Ok(child)
    }

    /// Scores the path from the root to `node` with the reward, records it as the node's
    /// value and returns it.
    pub fn evaluate(&mut self, node: NodeId) -> Result<f64> {
        let text = self.tree.path_text(node);
        let steps = self.tree.path_steps(node);
        let terminal = self.tree.node(node).terminal;
        let value = self.score(&text, &steps, terminal)?;
        self.record_value(node, value);
        Ok(value)
    }

    /// Records `value` as the value of an evaluation that ended at `node`.
    pub fn record_value(&mut self, node: NodeId, value: f64) {
        self.values[node.index()] = Some(value);
        self.best_value = self.best_value.max(value);
    }

    /// The reward of a path given as text and chosen steps.
    pub fn score(&self, text: &str, steps: &[StepOutput], terminal: bool) -> Result<f64> {
        let view = PathView { prompt: &self.prompt_text, text, steps, terminal };
        let value = self.reward.score(&view)?;
        if !value.is_finite() {
            return Err(Error::Reward(format!("the reward {} returned {value}", self.reward.name())));
        }
        Ok(value)
    }

    /// Progress so far.
    pub fn progress(&self) -> marco_core::Progress {
        marco_core::Progress {
            nodes: self.tree.len(),
            rollouts: self.tracker.rollouts,
            tokens_generated: self.tracker.generated_tokens,
            elapsed: self.tracker.elapsed(),
            best_value: if self.best_value.is_finite() { self.best_value } else { 0.0 },
        }
    }

    /// Frees every live state, held by nodes or by walkers.
    pub fn release_all(&mut self) -> Result<()> {
        let mut first_error = None;
        let held = self.seqs.iter_mut().filter_map(Option::take);
        for seq in held.chain(self.in_flight.drain(..)) {
            if let Err(e) = self.model.release(seq) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Frees every state and assembles the outcome for the path ending at `chosen`; the
    /// answer comes from the text after the path's last reflection.
    pub fn finish(
        mut self,
        policy: String,
        chosen: NodeId,
        value: f64,
        extractor: &dyn AnswerExtractor,
    ) -> Result<SearchOutcome> {
        // Counters before the release: `kv_bytes_in_use` is the memory the finished tree's
        // states held at the end of the search (after the release it would always be 0).
        let end_counters = self.model.counters();
        self.release_all()?;
        let text = self.tree.path_text(chosen);
        let answer = extractor.extract(&crate::vote::answer_text(&self.tree, chosen));
        let stats = SearchStats {
            nodes: self.tree.len(),
            rollouts: self.tracker.rollouts,
            tokens_generated: self.tracker.generated_tokens,
            tokens_computed: 0,
            distinct_tokens: self.tree.distinct_tokens(),
            kv_bytes_in_use: 0,
            kv_bytes_per_token: 0,
            elapsed_secs: self.tracker.elapsed().as_secs_f64(),
            stop_reason: self.stop.unwrap_or(StopReason::Completed),
        }
        .with_model_counters(&self.start_counters, &end_counters);
        Ok(SearchOutcome { policy, text, answer, path: self.tree.path(chosen), value, stats, tree: self.tree })
    }
}

impl From<marco_core::ActionEnd> for ActionEnd {
    fn from(end: marco_core::ActionEnd) -> Self {
        match end {
            marco_core::ActionEnd::Complete | marco_core::ActionEnd::Length => ActionEnd::Complete,
            marco_core::ActionEnd::Stop => ActionEnd::Stop,
            marco_core::ActionEnd::Context => ActionEnd::Context,
        }
    }
}

/// Fails unless a model answered each of `asked` requests.
fn check_answer_count(answered: usize, asked: usize, what: &str) -> Result<()> {
    if answered == asked {
        Ok(())
    } else {
        Err(Error::backend(std::io::Error::other(format!("the model answered {answered} of {asked} {what} requests"))))
    }
}

/// Mixed into the seed for the root's random-stream key.
const ROOT_KEY: u64 = 0x6d61_7263_6f2d_6b65;

/// Runs `body` on a started engine, then frees every model state whatever happened, so a
/// failed search leaks no sequence.
pub(crate) fn run_search<'a, T>(
    mut engine: Engine<'a>,
    body: impl FnOnce(&mut Engine<'a>) -> Result<T>,
) -> Result<(Engine<'a>, T)> {
    match body(&mut engine) {
        Ok(t) => Ok((engine, t)),
        Err(e) => {
            let _ = engine.release_all();
            Err(e)
        }
    }
}

/// What the model's chat template writes after an assistant message that ended at a stop
/// token, up to the start of the next assistant message, with `text` as the user message in
/// between; `None` when the template cannot say (no template, or an unexpected rendering).
///
/// Rendered twice around a placeholder answer: the turn is the part of the longer rendering
/// after the placeholder, less the stop token's own text (the sequence already holds it).
fn chat_turn_text(tokenizer: &dyn marco_core::Tokenizer, text: &str) -> Option<String> {
    use marco_core::ChatMessage;
    const PLACEHOLDER: &str = "marco-reflection-placeholder-answer";
    let rendered = tokenizer
        .apply_chat_template(
            &[ChatMessage::user("q"), ChatMessage::assistant(PLACEHOLDER), ChatMessage::user(text)],
            true,
        )
        .ok()?;
    let after = &rendered[rendered.find(PLACEHOLDER)? + PLACEHOLDER.len()..];
    let stop_texts = tokenizer.stop_tokens().iter().filter_map(|&t| tokenizer.decode(&[t], false).ok());
    let turn = stop_texts
        .filter(|s| !s.is_empty())
        .find_map(|s| after.strip_prefix(s.as_str()).map(str::to_string))
        .unwrap_or_else(|| after.to_string());
    turn.contains(text).then_some(turn)
}

//! UCT: the selection rule of MCTS, usable on any [`Tree`].
//!
//! A child's score is `Q + c·√(ln N / n)`: `Q` its mean value, `n` its visits, `N` its
//! parent's visits, `c` the exploration constant (√2 by default, the classic UCB1 value for
//! rewards in `[0, 1]`). An unvisited child scores `+∞`, so it is tried first. Ties go to the
//! child created first, so a selection is a pure function of the tree.
//!
//! The functions are public so that benchmarks and users' own policies can time or reuse the
//! exact rule the [`Mcts`](crate::Mcts) policy applies.

use marco_core::{Node, NodeId, Tree};

/// The UCT score of `child` under a parent visited `parent_visits` times.
pub fn uct_score(parent_visits: u64, child: &Node, exploration: f64) -> f64 {
    if child.visits == 0 {
        return f64::INFINITY;
    }
    let log_parent = (parent_visits.max(1) as f64).ln();
    child.mean_value() + exploration * (log_parent / child.visits as f64).sqrt()
}

/// The child of `node` with the highest UCT score, leaving out those `skip` names;
/// `None` if no child is left.
pub fn uct_select_child(
    tree: &Tree,
    node: NodeId,
    exploration: f64,
    mut skip: impl FnMut(NodeId) -> bool,
) -> Option<NodeId> {
    let parent = tree.node(node);
    let mut best: Option<(NodeId, f64)> = None;
    for &child in &parent.children {
        if skip(child) {
            continue;
        }
        let score = uct_score(parent.visits, tree.node(child), exploration);
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((child, score));
        }
    }
    best.map(|(id, _)| id)
}

/// Walks down from the root by UCT until `stop_here` accepts a node, and returns it;
/// `None` if the walk reaches a node with no child left to choose (all skipped, or none).
pub fn descend(
    tree: &Tree,
    exploration: f64,
    mut stop_here: impl FnMut(NodeId) -> bool,
    mut skip: impl FnMut(NodeId) -> bool,
) -> Option<NodeId> {
    let mut current = NodeId::ROOT;
    loop {
        if stop_here(current) {
            return Some(current);
        }
        current = uct_select_child(tree, current, exploration, &mut skip)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marco_core::NodeKind;

    #[test]
    fn scores_match_the_formula_and_unvisited_come_first() {
        let mut t = Tree::new(vec![1], "p".into());
        let a = t.add_child(NodeId::ROOT, NodeKind::Action, vec![2], vec![], "a".into());
        let b = t.add_child(NodeId::ROOT, NodeKind::Action, vec![3], vec![], "b".into());
        t.backpropagate(a, 0.9);
        t.backpropagate(a, 0.5);
        // Root: 2 visits; a: 2 visits, mean 0.7; b unvisited.
        assert_eq!(uct_select_child(&t, NodeId::ROOT, 1.4, |_| false), Some(b));
        t.backpropagate(b, 0.2);
        let expected_a = 0.7 + 1.4 * (3f64.ln() / 2.0).sqrt();
        let expected_b = 0.2 + 1.4 * (3f64.ln() / 1.0).sqrt();
        assert!((uct_score(3, t.node(a), 1.4) - expected_a).abs() < 1e-12);
        assert!((uct_score(3, t.node(b), 1.4) - expected_b).abs() < 1e-12);
        assert_eq!(uct_select_child(&t, NodeId::ROOT, 1.4, |_| false), Some(a));
        // More exploration favours the less visited child; pure exploitation picks the better mean; skipping removes a child.
        assert_eq!(uct_select_child(&t, NodeId::ROOT, 5.0, |_| false), Some(b));
        assert_eq!(uct_select_child(&t, NodeId::ROOT, 0.0, |_| false), Some(a));
        assert_eq!(uct_select_child(&t, NodeId::ROOT, 0.0, |id| id == a), Some(b));
        assert_eq!(uct_select_child(&t, NodeId::ROOT, 0.0, |_| true), None);
        assert_eq!(descend(&t, 0.0, |id| t.node(id).children.is_empty(), |_| false), Some(a));
    }
}

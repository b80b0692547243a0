//! Self-consistency: a majority vote over the answers of finished paths.
//!
//! Each leaf's answer is extracted from the text after the last reflection on its path (a
//! reflection restarts the thought, so an answer before it was withdrawn). The answer with
//! the most leaves wins; ties go to the larger summed value, then to the answer seen first.
//! The winning path is the answer's best-valued leaf.

use marco_core::{AnswerExtractor, NodeId, NodeKind, Tree};

/// The result of a vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// The winning answer.
    pub answer: String,
    /// Leaves that gave it.
    pub votes: usize,
    /// Leaves that gave any answer.
    pub voters: usize,
    /// The answer's best-valued leaf.
    pub node: NodeId,
    /// That leaf's value.
    pub value: f64,
}

/// Text of the path to `node` after its last reflection (all of it if there is none).
pub fn answer_text(tree: &Tree, node: NodeId) -> String {
    let path = tree.path(node);
    let start = path.iter().rposition(|&n| tree.node(n).kind == NodeKind::Reflection).map_or(1, |i| i + 1);
    path[start.max(1)..].iter().map(|&n| tree.node(n).text.as_str()).collect()
}

/// Votes over `leaves` (node and value); `None` if no leaf holds an answer.
pub fn vote(tree: &Tree, leaves: &[(NodeId, f64)], extractor: &dyn AnswerExtractor) -> Option<Vote> {
    // (answer, votes, summed value, best node, best value), in order of first appearance.
    let mut tally: Vec<(String, usize, f64, NodeId, f64)> = Vec::new();
    let mut voters = 0;
    for &(node, value) in leaves {
        let Some(answer) = extractor.extract(&answer_text(tree, node)) else { continue };
        voters += 1;
        match tally.iter_mut().find(|t| t.0 == answer) {
            Some(t) => {
                t.1 += 1;
                t.2 += value;
                if value > t.4 || (value == t.4 && node < t.3) {
                    t.3 = node;
                    t.4 = value;
                }
            }
            None => tally.push((answer, 1, value, node, value)),
        }
    }
    let mut best: Option<&(String, usize, f64, NodeId, f64)> = None;
    for t in &tally {
        if best.is_none_or(|b| t.1 > b.1 || (t.1 == b.1 && t.2 > b.2)) {
            best = Some(t);
        }
    }
    best.map(|b| Vote { answer: b.0.clone(), votes: b.1, voters, node: b.3, value: b.4 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use marco_core::LastNumber;

    #[test]
    fn majority_then_value_and_reflection_resets_the_answer() {
        let mut t = Tree::new(vec![0], "q".into());
        let a = t.add_child(NodeId::ROOT, NodeKind::Action, vec![1], vec![], "so 7".into());
        let b = t.add_child(NodeId::ROOT, NodeKind::Action, vec![2], vec![], "so 9".into());
        let c = t.add_child(NodeId::ROOT, NodeKind::Action, vec![3], vec![], "thus 9".into());
        let d = t.add_child(NodeId::ROOT, NodeKind::Action, vec![4], vec![], "no number".into());
        let v = vote(&t, &[(a, 0.9), (b, 0.2), (c, 0.3), (d, 1.0)], &LastNumber).unwrap();
        assert_eq!((v.answer.as_str(), v.votes, v.voters, v.node), ("9", 2, 3, c));
        // A tie in votes goes to the larger summed value.
        let v = vote(&t, &[(a, 0.9), (b, 0.2)], &LastNumber).unwrap();
        assert_eq!(v.answer, "7");
        assert!(vote(&t, &[(d, 1.0)], &LastNumber).is_none());
        // After a reflection only the new thought counts.
        let r = t.add_child(a, NodeKind::Reflection, vec![5], vec![], " Wait!".into());
        let e = t.add_child(r, NodeKind::Action, vec![6], vec![], " no idea".into());
        assert_eq!(answer_text(&t, e), " no idea");
        assert_eq!(answer_text(&t, a), "so 7");
        assert!(vote(&t, &[(e, 0.5)], &LastNumber).is_none());
    }
}

//! The search tree: an arena of nodes addressed by [`NodeId`], serialisable as a trace.
//!
//! The root holds the prompt; every other node is one edge of the search (an action the
//! model generated, or an appended reflection prompt) and holds that edge's tokens. The text
//! of a path is the concatenation of its nodes' texts.
//!
//! Visit counts follow one convention in every policy: a node's `visits` is the number of
//! evaluations (rollouts) whose path passed through it, so a parent's visits equal the sum
//! of its children's visits plus the evaluations that ended at the parent itself
//! ([`Node::own_evaluations`]).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::token::{StepOutput, TokenId};

/// Index of a node in its [`Tree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The root of every tree.
    pub const ROOT: NodeId = NodeId(0);

    /// The index into [`Tree::nodes`].
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What an edge of the tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// The prompt.
    Root,
    /// Tokens the model generated.
    Action,
    /// A reflection prompt appended to a finished thought.
    Reflection,
}

/// One node of the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// This node's id.
    pub id: NodeId,
    /// The parent (none for the root).
    pub parent: Option<NodeId>,
    /// Children in creation order.
    pub children: Vec<NodeId>,
    /// What the edge into this node is.
    pub kind: NodeKind,
    /// Tokens of the edge (the prompt for the root).
    pub tokens: Vec<TokenId>,
    /// Step outputs of the tokens the model chose on this edge (empty for appended tokens).
    pub steps: Vec<StepOutput>,
    /// Text of the edge.
    pub text: String,
    /// Edges from the root.
    pub depth: u32,
    /// Evaluations whose path passed through this node.
    pub visits: u64,
    /// Sum of those evaluations' values.
    pub value_sum: f64,
    /// Evaluations that ended at this node itself.
    pub own_evaluations: u64,
    /// Mean confidence of this edge's chosen tokens (0 where it has none).
    pub confidence: f64,
    /// Whether the path ends here (stop token, context or step limit).
    pub terminal: bool,
}

impl Node {
    /// Mean value of the evaluations through this node (0 before any).
    pub fn mean_value(&self) -> f64 {
        if self.visits == 0 {
            0.0
        } else {
            self.value_sum / self.visits as f64
        }
    }
}

/// The arena.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    /// All nodes; `nodes[i].id == NodeId(i)`.
    pub nodes: Vec<Node>,
}

impl Tree {
    /// A tree holding only the root with the prompt's tokens and text.
    pub fn new(prompt_tokens: Vec<TokenId>, prompt_text: String) -> Self {
        Tree {
            nodes: vec![Node {
                id: NodeId::ROOT,
                parent: None,
                children: Vec::new(),
                kind: NodeKind::Root,
                tokens: prompt_tokens,
                steps: Vec::new(),
                text: prompt_text,
                depth: 0,
                visits: 0,
                value_sum: 0.0,
                own_evaluations: 0,
                confidence: 0.0,
                terminal: false,
            }],
        }
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is only a root (it is never empty).
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The node `id`. Panics on an id of another tree: ids are only made by [`Tree::add_child`].
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// The node `id`, mutably.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.index()]
    }

    /// Adds a child of `parent` and returns its id.
    pub fn add_child(
        &mut self,
        parent: NodeId,
        kind: NodeKind,
        tokens: Vec<TokenId>,
        steps: Vec<StepOutput>,
        text: String,
    ) -> NodeId {
        let id = NodeId(self.nodes.len() as u32);
        let depth = self.nodes[parent.index()].depth + 1;
        self.nodes.push(Node {
            id,
            parent: Some(parent),
            children: Vec::new(),
            kind,
            tokens,
            steps,
            text,
            depth,
            visits: 0,
            value_sum: 0.0,
            own_evaluations: 0,
            confidence: 0.0,
            terminal: false,
        });
        self.nodes[parent.index()].children.push(id);
        id
    }

    /// Ids from the root to `id`, both included.
    pub fn path(&self, id: NodeId) -> Vec<NodeId> {
        let mut path = vec![id];
        let mut cur = id;
        while let Some(p) = self.nodes[cur.index()].parent {
            path.push(p);
            cur = p;
        }
        path.reverse();
        path
    }

    /// Generated text from the root (exclusive) to `id` (inclusive).
    pub fn path_text(&self, id: NodeId) -> String {
        self.path(id).into_iter().skip(1).map(|n| self.nodes[n.index()].text.as_str()).collect()
    }

    /// Step outputs of the chosen tokens from the root to `id`.
    pub fn path_steps(&self, id: NodeId) -> Vec<StepOutput> {
        self.path(id).into_iter().flat_map(|n| self.nodes[n.index()].steps.iter().cloned()).collect()
    }

    /// Tokens of the whole sequence at `id`: prompt, then every edge.
    pub fn path_tokens(&self, id: NodeId) -> Vec<TokenId> {
        self.path(id).into_iter().flat_map(|n| self.nodes[n.index()].tokens.iter().copied()).collect()
    }

    /// Adds one evaluation of `value` that ended at `id` to it and every ancestor.
    pub fn backpropagate(&mut self, id: NodeId, value: f64) {
        self.nodes[id.index()].own_evaluations += 1;
        let mut cur = Some(id);
        while let Some(n) = cur {
            let node = &mut self.nodes[n.index()];
            node.visits += 1;
            node.value_sum += value;
            cur = node.parent;
        }
    }

    /// Distinct token positions in the tree: the prompt plus every edge's tokens.
    pub fn distinct_tokens(&self) -> u64 {
        self.nodes.iter().map(|n| n.tokens.len() as u64).sum()
    }

    /// Ids of terminal nodes.
    pub fn terminal_nodes(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|n| n.terminal).map(|n| n.id).collect()
    }

    /// The trace as JSON.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(self)?)
    }

    /// A tree from its JSON trace.
    pub fn from_json(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// Graphviz DOT: one box per node (text, visits, value, confidence); `highlight` (the
    /// chosen path) drawn bold.
    pub fn to_dot(&self, highlight: &[NodeId]) -> String {
        let mut out = String::from("digraph search {\n  node [shape=box, fontname=\"monospace\"];\n");
        for n in &self.nodes {
            let mut label: String = n.text.chars().take(60).collect();
            if n.text.chars().count() > 60 {
                label.push('…');
            }
            let label = label.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let style = if highlight.contains(&n.id) { ", style=bold, color=blue" } else { "" };
            let shape = match n.kind {
                NodeKind::Root => ", shape=ellipse",
                NodeKind::Reflection => ", shape=note",
                NodeKind::Action if n.terminal => ", peripheries=2",
                NodeKind::Action => "",
            };
            let _ = writeln!(
                out,
                "  n{} [label=\"#{} {}\\nN={} V={:.3} c={:.3}\"{}{}];",
                n.id.0,
                n.id.0,
                if n.kind == NodeKind::Root { "prompt".to_string() } else { label },
                n.visits,
                n.mean_value(),
                n.confidence,
                shape,
                style
            );
            if let Some(p) = n.parent {
                let _ = writeln!(out, "  n{} -> n{};", p.0, n.id.0);
            }
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_backprop_and_round_trip() {
        let mut t = Tree::new(vec![1, 2], "prompt".into());
        let a = t.add_child(NodeId::ROOT, NodeKind::Action, vec![3], vec![], "a".into());
        let b = t.add_child(a, NodeKind::Action, vec![4, 5], vec![], "b\"\n".into());
        assert_eq!(t.path(b), vec![NodeId::ROOT, a, b]);
        assert_eq!(t.path_text(b), "ab\"\n");
        assert_eq!(t.path_tokens(b), vec![1, 2, 3, 4, 5]);
        assert_eq!(t.distinct_tokens(), 5);
        t.backpropagate(b, 0.5);
        t.backpropagate(a, 1.0);
        assert_eq!(t.node(NodeId::ROOT).visits, 2);
        assert_eq!(t.node(a).visits, 2);
        assert_eq!(t.node(a).own_evaluations, 1);
        assert!((t.node(a).mean_value() - 0.75).abs() < 1e-12);
        let back = Tree::from_json(&t.to_json().unwrap()).unwrap();
        assert_eq!(back, t);
        let dot = t.to_dot(&[a]);
        assert!(dot.contains("n0 -> n1") && dot.contains("style=bold") && dot.contains("b\\\"\\n"));
    }
}

//! The HTML trace viewer: escaping, every node present, the chosen path marked, no network
//! references, and robustness to deep, large and malformed trees.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use marco::trace_html::{escape_html, render};
use marco_core::{NodeId, NodeKind, SearchOutcome, SearchStats, StopReason, Tree};

fn stats(nodes: usize) -> SearchStats {
    SearchStats {
        nodes,
        rollouts: 4,
        tokens_generated: 123,
        tokens_computed: 456,
        distinct_tokens: 200,
        kv_bytes_in_use: 0,
        kv_bytes_per_token: 0,
        elapsed_secs: 1.5,
        stop_reason: StopReason::TokenBudget,
    }
}

/// root ─┬─ a ("Step 1: 3 + 5 = 8\n\n") ─┬─ c (<script>) ─ e (reflection)
///       │                               └─ d (terminal, chosen)
///       └─ b ("Step 1: guess")
fn small_outcome() -> (SearchOutcome, [NodeId; 5]) {
    let mut tree = Tree::new(vec![1, 2, 3], "user: What is 3 + 5?\nassistant: ".into());
    let a = tree.add_child(NodeId::ROOT, NodeKind::Action, vec![4], vec![], "Step 1: 3 + 5 = 8\n\n".into());
    let b = tree.add_child(NodeId::ROOT, NodeKind::Action, vec![5], vec![], "Step 1: guess".into());
    let c = tree.add_child(a, NodeKind::Action, vec![6], vec![], "<script>alert('x')</script> & \"q\"".into());
    let d = tree.add_child(a, NodeKind::Action, vec![7], vec![], "The answer is 8.".into());
    let e = tree.add_child(c, NodeKind::Reflection, vec![8], vec![], "Wait! Maybe I made some mistakes!".into());
    tree.node_mut(a).confidence = 0.8125;
    tree.node_mut(d).confidence = 0.9375;
    tree.node_mut(d).terminal = true;
    tree.backpropagate(d, 0.9);
    tree.backpropagate(e, 0.2);
    tree.backpropagate(b, 0.1);
    let path = tree.path(d);
    let outcome = SearchOutcome {
        policy: "mcts(c=1.4, width=2) <x>".into(),
        text: tree.path_text(d),
        answer: Some("8".into()),
        path,
        value: 0.9,
        stats: stats(tree.len()),
        tree,
    };
    (outcome, [a, b, c, d, e])
}

/// The opening tag of node `id`'s row.
fn row_tag(html: &str, id: u32) -> &str {
    let at = html.find(&format!("id=\"n{id}\"")).unwrap_or_else(|| panic!("node {id} missing"));
    let start = html[..at].rfind('<').unwrap();
    let end = at + html[at..].find('>').unwrap();
    &html[start..=end]
}

#[test]
fn node_text_is_escaped() {
    let (outcome, _) = small_outcome();
    let html = render(&outcome);
    assert!(!html.contains("<script>alert"), "raw script tag from node text");
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"));
    assert!(html.contains("mcts(c=1.4, width=2) &lt;x&gt;"), "the policy name is escaped too");
    // The only script element is the viewer's own.
    assert_eq!(html.matches("<script").count(), 1);
    assert_eq!(escape_html("a<b>&'\""), "a&lt;b&gt;&amp;&#39;&quot;");
}

#[test]
fn every_node_is_present_with_its_numbers() {
    let (outcome, [a, _, _, d, _]) = small_outcome();
    let html = render(&outcome);
    for node in &outcome.tree.nodes {
        assert_eq!(html.matches(&format!("id=\"n{}\"", node.id.0)).count(), 1, "node {}", node.id.0);
        assert!(html.contains(&format!("<s>#{}</s>", node.id.0)));
    }
    // Node a: 2 visits, mean (0.9 + 0.2) / 2 = 0.55, confidence 0.8125.
    let a_row = &html[html.find(&format!("id=\"n{}\"", a.0)).unwrap()..];
    assert!(
        a_row.starts_with(&format!("id=\"n{}\" data-e=\"4\" style=\"--d:1\"><i>2</i><i>0.550</i><i>0.812</i>", a.0))
    );
    let d_row = &html[html.find(&format!("id=\"n{}\"", d.0)).unwrap()..];
    let d_row = &d_row[..d_row.find("</div>").unwrap()];
    assert!(d_row.contains("<i>1</i><i>0.900</i><i>0.938</i>"), "{d_row}");
    assert!(d_row.contains("<span class=\"k e\">end</span>"), "terminal flag");
    assert!(html.contains("<span class=\"k r\">reflection</span>"));
    // An edge without text says so.
    let (mut empty, _) = small_outcome();
    empty.tree.node_mut(d).text.clear();
    assert!(render(&empty).contains("<q class=\"none\">(no text)</q>"));
    // Line breaks are shown, not lost.
    assert!(html.contains("3 + 5 = 8<u>↵</u>\n<u>↵</u>\n"));
    // Header counters.
    for needle in ["<dd><strong>8</strong></dd>", "<dd>123</dd>", "<dd>456</dd>", "<dd>2.28</dd>", "TokenBudget"] {
        assert!(html.contains(needle), "{needle}");
    }
}

#[test]
fn chosen_path_is_marked_and_nothing_else() {
    let (outcome, [a, b, c, d, e]) = small_outcome();
    let html = render(&outcome);
    for id in [NodeId::ROOT, a, d] {
        assert!(row_tag(&html, id.0).starts_with("<div class=\"r0 p\""), "{id:?} on the path");
    }
    for id in [b, c, e] {
        assert!(row_tag(&html, id.0).starts_with("<div class=\"r0\""), "{id:?} off the path");
    }
}

#[test]
fn rows_are_depth_first_with_subtree_ends() {
    let (outcome, [a, b, c, d, e]) = small_outcome();
    let html = render(&outcome);
    let order: Vec<usize> =
        [NodeId::ROOT, a, c, e, d, b].iter().map(|id| html.find(&format!("id=\"n{}\"", id.0)).unwrap()).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "depth-first, children in creation order");
    // Rows: 0 root, 1 a, 2 c, 3 e, 4 d, 5 b: a's subtree ends at row 4, c's at 3, leaves at themselves.
    for (id, end) in [(NodeId::ROOT, 5), (a, 4), (c, 3), (e, 3), (d, 4), (b, 5)] {
        assert!(row_tag(&html, id.0).contains(&format!("data-e=\"{end}\"")), "{id:?}: {}", row_tag(&html, id.0));
    }
}

#[test]
fn self_contained_without_network_references() {
    let (outcome, _) = small_outcome();
    let html = render(&outcome);
    assert!(html.starts_with("<!DOCTYPE html>"));
    for forbidden in ["http://", "https://", "src=", "<link", "@import", "url("] {
        assert!(!html.contains(forbidden), "{forbidden}");
    }
    assert!(html.contains("<style>") && html.contains("<script>"));
}

#[test]
fn large_deep_trees_stay_flat_and_small() {
    // A 10,000-node tree: a 5,000-edge chain (token granularity) plus 5,000 leaves on the root.
    let mut tree = Tree::new(vec![0], "prompt".into());
    let mut last = NodeId::ROOT;
    for i in 0..5_000 {
        last = tree.add_child(last, NodeKind::Action, vec![i], vec![], format!("t{i}"));
    }
    for i in 0..4_999 {
        tree.add_child(NodeId::ROOT, NodeKind::Action, vec![i], vec![], format!("leaf {i}"));
    }
    assert_eq!(tree.len(), 10_000);
    tree.backpropagate(last, 0.5);
    let outcome = SearchOutcome {
        policy: "token".into(),
        text: String::new(),
        answer: None,
        path: tree.path(last),
        value: 0.5,
        stats: stats(tree.len()),
        tree,
    };
    let html = render(&outcome);
    assert_eq!(html.matches("<div class=\"r0").count(), 10_000);
    assert!(html.len() < 3_000_000, "{} bytes", html.len());
    // Flat: nesting does not follow the tree's depth.
    assert_eq!(html.matches("</q></span></div>\n<div class=\"r0").count(), 9_999, "each row closes before the next");
    assert!(row_tag(&html, 5_000).contains("--d:5000"));
    assert!(html.contains("<s>d5000</s>"), "deep rows name their depth");
}

#[test]
fn malformed_trees_do_not_panic() {
    let (mut outcome, [a, ..]) = small_outcome();
    // A cycle, an id out of range, and a path through a node that does not exist.
    outcome.tree.node_mut(a).children.push(NodeId::ROOT);
    outcome.tree.node_mut(a).children.push(NodeId(999));
    outcome.path.push(NodeId(12345));
    let html = render(&outcome);
    for node in &outcome.tree.nodes {
        assert_eq!(html.matches(&format!("id=\"n{}\"", node.id.0)).count(), 1);
    }
    // A node no parent lists is still shown, after the root's tree.
    outcome.tree.node_mut(NodeId::ROOT).children.retain(|c| c.0 != 2);
    let html = render(&outcome);
    assert!(html.find("id=\"n2\"").unwrap() > html.find("id=\"n4\"").unwrap());
    // The trace read back from JSON renders the same page.
    let (outcome, _) = small_outcome();
    let back = SearchOutcome::from_json(&outcome.to_json().unwrap()).unwrap();
    assert_eq!(render(&back), render(&outcome));
}

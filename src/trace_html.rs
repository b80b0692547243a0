//! A search trace as one self-contained HTML page: open it in any browser, offline.
//!
//! [`render`] writes inline CSS and a few lines of inline JavaScript, nothing fetched from a
//! network. The page has a header (policy, answer, value, counters, the prompt and the
//! chosen text) and the tree below it.
//!
//! The tree is a *flat* list of rows in depth-first order, indented by depth, rather than
//! nested elements: a token-granularity search makes paths thousands of edges deep, deeper
//! than an HTML parser will nest, and a flat list of ~10k rows stays fast. Because a node's
//! descendants are contiguous in depth-first order, each row carries the position of its
//! last descendant (`data-e`), and collapsing a node hides exactly that range. Without
//! JavaScript the page still shows the whole tree, expanded. Rows on the chosen path carry
//! the class `p` and are highlighted; the search's per-token data is left out, so the page's
//! size stays proportional to the tree's text.

use std::fmt::Write as _;

use marco_core::{NodeKind, SearchOutcome};

/// Rows above which the page opens showing only the chosen path (the rest collapsed).
const LARGE_TREE_ROWS: usize = 1500;
/// Depth past which rows stop indenting further (the CSS says the same) and name their depth.
const INDENT_CAP: usize = 24;

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Escaped text with each line break shown as a visible `↵` mark (kept as a real break for
/// the wrapped view).
fn escape_text(text: &str) -> String {
    escape_html(text).replace('\n', "<u>↵</u>\n")
}

/// One row of the flat tree: a node, its depth, and the position of its last descendant.
struct Row {
    node: usize,
    depth: usize,
    end: usize,
}

/// The tree in depth-first order, children in creation order. Robust to a malformed trace
/// (read back from JSON): ids out of range are skipped, no node is listed twice, and nodes
/// not reachable from the root are listed after it as further roots.
fn depth_first_rows(outcome: &SearchOutcome) -> Vec<Row> {
    let nodes = &outcome.tree.nodes;
    let mut seen = vec![false; nodes.len()];
    let mut rows: Vec<Row> = Vec::with_capacity(nodes.len());
    for start in 0..nodes.len() {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        // (node, depth, row of its parent in `rows`)
        let mut stack = vec![(start, 0usize, None::<usize>)];
        let mut parent_row: Vec<Option<usize>> = Vec::new();
        let first = rows.len();
        while let Some((node, depth, parent)) = stack.pop() {
            let me = rows.len();
            rows.push(Row { node, depth, end: me });
            parent_row.push(parent);
            for child in nodes[node].children.iter().rev() {
                let c = child.index();
                if c < nodes.len() && !seen[c] {
                    seen[c] = true;
                    stack.push((c, depth + 1, Some(me)));
                }
            }
        }
        // A subtree ends where its last descendant's subtree ends: fill ends bottom-up.
        for i in (first..rows.len()).rev() {
            if let Some(p) = parent_row[i - first] {
                rows[p].end = rows[p].end.max(rows[i].end);
            }
        }
    }
    rows
}

/// The whole page for `outcome`. See the [module documentation](self).
pub fn render(outcome: &SearchOutcome) -> String {
    let stats = &outcome.stats;
    let tree = &outcome.tree;
    let rows = depth_first_rows(outcome);
    let mut on_path = vec![false; tree.nodes.len()];
    for id in &outcome.path {
        if let Some(flag) = on_path.get_mut(id.index()) {
            *flag = true;
        }
    }
    let text_bytes: usize = tree.nodes.iter().map(|n| n.text.len()).sum();
    let mut html = String::with_capacity(8192 + text_bytes + 160 * rows.len());

    html.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(html, "<title>marco trace: {}</title>", escape_html(&outcome.policy));
    let _ = writeln!(html, "<style>{STYLE}</style>\n</head>\n<body>");

    // Header: what was searched, what came out, what it cost.
    html.push_str("<header>\n<h1>marco search trace</h1>\n<dl class=\"stats\">\n");
    let answer = outcome.answer.as_deref().map(escape_html).unwrap_or_else(|| "<em>none</em>".into());
    let _ = writeln!(html, "<div class=\"wide\"><dt>policy</dt><dd>{}</dd></div>", escape_html(&outcome.policy));
    let mut stat = |name: &str, value: String| {
        let _ = writeln!(html, "<div><dt>{name}</dt><dd>{value}</dd></div>");
    };
    stat("answer", format!("<strong>{answer}</strong>"));
    stat("value", format!("{:.4}", outcome.value));
    stat("stopped by", format!("{:?}", stats.stop_reason));
    stat("nodes", stats.nodes.to_string());
    stat("rollouts", stats.rollouts.to_string());
    stat("tokens generated", stats.tokens_generated.to_string());
    stat("tokens computed", stats.tokens_computed.to_string());
    stat("distinct tokens", stats.distinct_tokens.to_string());
    stat("recompute ratio", format!("{:.2}", stats.recompute_ratio()));
    stat("time", format!("{:.2} s", stats.elapsed_secs));
    stat("generated tok/s", format!("{:.1}", stats.tokens_per_second()));
    if stats.kv_bytes_in_use > 0 {
        stat("KV cache", format!("{:.1} MiB", stats.kv_bytes_in_use as f64 / (1024.0 * 1024.0)));
    }
    html.push_str("</dl>\n");
    if let Some(root) = tree.nodes.first() {
        let _ = writeln!(
            html,
            "<details class=\"block\"><summary>Prompt ({} tokens)</summary><pre>{}</pre></details>",
            root.tokens.len(),
            escape_html(&root.text)
        );
    }
    let _ = writeln!(
        html,
        "<details class=\"block\" open><summary>Chosen path ({} edges)</summary><pre>{}</pre></details>",
        outcome.path.len().saturating_sub(1),
        escape_html(&outcome.text)
    );
    html.push_str("</header>\n");

    html.push_str(
        "<nav><button data-act=\"expand\">Expand all</button><button data-act=\"collapse\">Collapse all</button>\
         <button data-act=\"path\">Chosen path only</button><label><input type=\"checkbox\" id=\"wrap\"> wrap text</label>\
         <span class=\"legend\"><span class=\"k a\">action</span><span class=\"k r\">reflection</span>\
         <span class=\"k e\">end</span><span class=\"swatch\"></span>chosen path · N visits · V mean value · \
         c confidence · click ▸ to fold, text to wrap</span></nav>\n",
    );

    // The tree.
    html.push_str("<main id=\"tree\">\n<div class=\"hd\"><i>N</i><i>V</i><i>c</i><span>node</span></div>\n");
    for (position, row) in rows.iter().enumerate() {
        let node = &tree.nodes[row.node];
        let (kind_class, kind_name) = match node.kind {
            NodeKind::Root => ("o", "root"),
            NodeKind::Action => ("a", "action"),
            NodeKind::Reflection => ("r", "reflection"),
        };
        let confidence =
            if node.kind == NodeKind::Action { format!("{:.3}", node.confidence) } else { "–".to_string() };
        let _ = write!(
            html,
            "<div class=\"{}\" id=\"n{}\" data-e=\"{}\" style=\"--d:{}\"><i>{}</i><i>{:.3}</i><i>{}</i>\
             <span class=\"t\"><b class=\"g\"></b><s>#{}</s><span class=\"k {kind_class}\">{kind_name}</span>",
            if on_path[row.node] { "r0 p" } else { "r0" },
            node.id.0,
            row.end,
            row.depth,
            node.visits,
            node.mean_value(),
            confidence,
            node.id.0,
        );
        if node.terminal {
            html.push_str("<span class=\"k e\">end</span>");
        }
        if row.depth > INDENT_CAP {
            let _ = write!(html, "<s>d{}</s>", row.depth);
        }
        if node.text.is_empty() {
            // An edge of only a stop token (or of tokens that decode to nothing).
            html.push_str("<q class=\"none\">(no text)</q></span></div>\n");
        } else {
            let _ = writeln!(html, "<q>{}</q></span></div>", escape_text(&node.text));
        }
        debug_assert!(row.end >= position);
    }
    html.push_str("</main>\n");
    let _ = writeln!(html, "<script>const LARGE={LARGE_TREE_ROWS};{SCRIPT}</script>\n</body>\n</html>");
    html
}

const STYLE: &str = r#"
:root{--bg:#fbfbfa;--fg:#1d1f21;--mut:#6b7075;--line:#e3e4e6;--path:#fff3c4;--pathb:#e0a800;
--a:#dbe8ff;--af:#1f4fa8;--r:#efe0ff;--rf:#6a2fa8;--e:#d8f5df;--ef:#1d7a37;--o:#e8e8e8;--of:#444}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"DejaVu Sans",sans-serif}
header{padding:14px 20px 6px;border-bottom:1px solid var(--line);background:#fff}
h1{font-size:17px;margin:0 0 8px;font-weight:600}
dl.stats{display:flex;flex-wrap:wrap;gap:6px 22px;margin:0 0 8px}
dl.stats div{display:flex;flex-direction:column}
dl.stats div.wide{flex-basis:100%}
dl.stats .wide dd{max-width:none;font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace}
dt{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:var(--mut)}
dd{margin:0;font-variant-numeric:tabular-nums;max-width:60ch;overflow-wrap:anywhere}
details.block{margin:4px 0 8px}
details.block summary{cursor:pointer;color:var(--mut);font-size:13px}
pre{margin:4px 0 0;padding:8px 10px;background:#f4f5f6;border:1px solid var(--line);border-radius:4px;
white-space:pre-wrap;overflow-wrap:anywhere;max-height:14em;overflow:auto;font:12.5px/1.4 ui-monospace,
"DejaVu Sans Mono",monospace}
nav{position:sticky;top:0;z-index:2;display:flex;flex-wrap:wrap;align-items:center;gap:8px;padding:7px 20px;
background:#fff;border-bottom:1px solid var(--line)}
button{font:inherit;font-size:12.5px;padding:2px 9px;border:1px solid #c9ccd0;border-radius:4px;background:#f6f7f8;
cursor:pointer}
button:hover{background:#eceef0}
label{font-size:12.5px;color:var(--mut)}
.legend{font-size:12px;color:var(--mut);display:flex;align-items:center;gap:6px;flex-wrap:wrap}
.swatch{display:inline-block;width:14px;height:12px;background:var(--path);border-left:3px solid var(--pathb)}
main{padding:4px 0 40px;font:12.5px/1.5 ui-monospace,"DejaVu Sans Mono",Menlo,monospace}
.r0,.hd{display:flex;align-items:flex-start;padding:1px 20px 1px 14px;border-left:3px solid transparent}
.hd{color:var(--mut);border-bottom:1px solid var(--line);margin-bottom:2px}
.r0:hover{background:#f0f2f4}
.r0.p{background:var(--path);border-left-color:var(--pathb)}
.r0.p>.t>s:first-of-type{font-weight:700;color:var(--fg)}
.r0>i,.hd>i{flex:0 0 7ch;text-align:right;font-style:normal;padding-right:1ch;font-variant-numeric:tabular-nums}
.hd>span{padding-left:2ch}
.t{flex:1;min-width:0;display:flex;align-items:flex-start;gap:.6ch;padding-left:calc(2ch + min(var(--d),24) * 2ch)}
.t s{text-decoration:none;color:var(--mut);flex:none}
.g{flex:none;width:1.6ch;cursor:pointer;color:var(--mut);font-weight:400;text-align:center}
.g::before{content:"▾"}
.r0.c .g::before{content:"▸";color:var(--fg)}
.r0.leaf .g::before{content:"·";cursor:default}
.k{flex:none;font:11px/1.5 system-ui,sans-serif;padding:0 5px;border-radius:3px;background:var(--o);color:var(--of)}
.k.a{background:var(--a);color:var(--af)}
.k.r{background:var(--r);color:var(--rf)}
.k.e{background:var(--e);color:var(--ef)}
q{quotes:none;flex:1;min-width:0;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;cursor:pointer}
q u{text-decoration:none;color:#a0a4a8}
q.none{color:#a0a4a8;font-style:italic}
.r0.w q,body.wrap q{white-space:pre-wrap;overflow-wrap:anywhere}
.r0[hidden]{display:none}
"#;

const SCRIPT: &str = r#"
(function(){
const rows=Array.from(document.querySelectorAll('#tree .r0'));
const end=rows.map(r=>+r.dataset.e);
rows.forEach((r,i)=>{if(end[i]===i)r.classList.add('leaf')});
function layout(){let i=0;const n=rows.length;while(i<n){rows[i].hidden=false;
if(rows[i].classList.contains('c')){for(let j=i+1;j<=end[i];j++)rows[j].hidden=true;i=end[i]+1}else i++}}
function all(c){rows.forEach((r,i)=>r.classList.toggle('c',c&&end[i]>i));layout()}
function pathOnly(){rows.forEach((r,i)=>r.classList.toggle('c',end[i]>i&&!r.classList.contains('p')));layout()}
document.getElementById('tree').addEventListener('click',e=>{const r=e.target.closest('.r0');if(!r)return;
const i=rows.indexOf(r);if(e.target.classList.contains('g')){if(end[i]>i){r.classList.toggle('c');layout()}}
else if(e.target.closest('q'))r.classList.toggle('w')});
document.querySelector('nav').addEventListener('click',e=>{const a=e.target.dataset&&e.target.dataset.act;
if(a==='expand')all(false);else if(a==='collapse')all(true);else if(a==='path')pathOnly()});
document.getElementById('wrap').addEventListener('change',e=>document.body.classList.toggle('wrap',e.target.checked));
if(rows.length>LARGE)pathOnly();
})();
"#;

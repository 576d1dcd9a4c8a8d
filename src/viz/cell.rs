//! Cells as graphs: Graphviz DOT (as the original DARTS `visualize.py` draws them) and a terminal view.
use crate::genotype::Genotype;
use crate::space::OpKind;

/// Which of a genotype's two cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellKind {
    /// The normal cell (keeps the resolution).
    Normal,
    /// The reduction cell (halves it, doubles the channels).
    Reduce,
}

impl CellKind {
    /// "normal" or "reduce".
    pub fn name(self) -> &'static str {
        match self {
            CellKind::Normal => "normal",
            CellKind::Reduce => "reduce",
        }
    }

    /// Both kinds, normal first.
    pub fn both() -> [CellKind; 2] {
        [CellKind::Normal, CellKind::Reduce]
    }
}

/// The name of a cell's state `j` as the DARTS paper writes it: c_{k-2}, c_{k-1}, then the intermediate nodes 0, 1, ...
pub fn state_name(j: usize) -> String {
    match j {
        0 => "c_{k-2}".to_string(),
        1 => "c_{k-1}".to_string(),
        _ => (j - 2).to_string(),
    }
}

/// Labels of the supernet's edges in alpha's row order: for node 0 its 2 inputs, for node 1 its 3, and so on
/// (e.g. "c_{k-2} → 0").
pub fn edge_labels(nodes: usize) -> Vec<String> {
    (0..nodes).flat_map(|i| (0..i + 2).map(move |j| format!("{} → {}", state_name(j), i))).collect()
}

/// The cell's (op, input) list and its concatenated nodes.
fn parts(g: &Genotype, kind: CellKind) -> (&[(OpKind, usize)], &[usize]) {
    match kind {
        CellKind::Normal => (&g.normal, &g.normal_concat),
        CellKind::Reduce => (&g.reduce, &g.reduce_concat),
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The cell as a Graphviz digraph, laid out left to right: the two inputs, each kept op as its own node
/// (`e0`, `e1`, ... in genotype order, so that no label can drift away from its edge), the intermediate
/// nodes, and the output c_{k} fed by the concatenated nodes. Valid input for Graphviz's `dot` too.
pub fn cell_dot(g: &Genotype, kind: CellKind) -> String {
    let (ops, concat) = parts(g, kind);
    let nodes = ops.len() / 2;
    let mut s = format!("digraph {} {{\n  rankdir=LR;\n", kind.name());
    s.push_str("  node [shape=box, style=filled, fontsize=14, fillcolor=\"#add8e6\"];\n");
    for input in ["c_{k-2}", "c_{k-1}"] {
        s.push_str(&format!("  {} [fillcolor=\"#c1ffc1\"];\n", quote(input)));
    }
    for i in 0..nodes {
        s.push_str(&format!("  {};\n", quote(&i.to_string())));
    }
    for (k, (op, _)) in ops.iter().enumerate() {
        let fill = match op {
            OpKind::SkipConnect => "#ffffff",
            o if o.is_pool() => "#e8e8e8",
            _ => "#ffe4b5",
        };
        s.push_str(&format!(
            "  {} [label={}, shape=ellipse, fontsize=12, fillcolor=\"{fill}\"];\n",
            quote(&format!("e{k}")),
            quote(op.name())
        ));
    }
    for (k, (_, j)) in ops.iter().enumerate() {
        s.push_str(&format!(
            "  {} -> {} -> {};\n",
            quote(&state_name(*j)),
            quote(&format!("e{k}")),
            quote(&(k / 2).to_string())
        ));
    }
    s.push_str(&format!("  {} [fillcolor=\"#eee8aa\"];\n", quote("c_{k}")));
    for &c in concat {
        s.push_str(&format!("  {} -> {};\n", quote(&state_name(c)), quote("c_{k}")));
    }
    s.push_str("}\n");
    s
}

/// The cell drawn as SVG (layout by layout-rs).
pub fn cell_svg(g: &Genotype, kind: CellKind) -> anyhow::Result<String> {
    super::dot_to_svg(&cell_dot(g, kind))
}

/// A terminal view of one cell: an adjacency table (rows: intermediate nodes, columns: the states they may
/// read) with the op on each kept edge, and the output's concatenation.
pub fn cell_text(g: &Genotype, kind: CellKind) -> String {
    let (ops, concat) = parts(g, kind);
    let nodes = ops.len() / 2;
    let states = nodes + 1; // node i reads states 0..i+2; the last node can read up to state nodes.
    let cols: Vec<String> = (0..states).map(state_name).collect();
    let mut grid = vec![vec![String::from("·"); states]; nodes];
    for (k, (op, j)) in ops.iter().enumerate() {
        let cell = &mut grid[k / 2][*j];
        *cell = if cell == "·" { op.name().to_string() } else { format!("{cell}+{}", op.name()) };
    }
    for (i, row) in grid.iter_mut().enumerate() {
        for cell in row.iter_mut().skip(i + 2) {
            cell.clear();
        }
    }
    let first = format!("node {}", nodes.saturating_sub(1)).len();
    let widths: Vec<usize> = (0..states)
        .map(|c| grid.iter().map(|r| r[c].chars().count()).chain([cols[c].chars().count()]).max().unwrap_or(0))
        .collect();
    let mut out = format!("{} cell\n", kind.name());
    out.push_str(&format!("  {:first$}", ""));
    for (c, name) in cols.iter().enumerate() {
        out.push_str(&format!("  {:w$}", name, w = widths[c]));
    }
    out = out.trim_end().to_string() + "\n";
    for (i, row) in grid.iter().enumerate() {
        let mut line = format!("  {:first$}", format!("node {i}"));
        for (c, cell) in row.iter().enumerate() {
            line.push_str(&format!("  {:w$}", cell, w = widths[c]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let concat: Vec<String> = concat.iter().map(|&c| state_name(c)).collect();
    out.push_str(&format!("  output c_{{k}} = concat({})\n", concat.join(", ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_has_every_edge_of_the_genotype() {
        let g = crate::zoo::get("DARTS_V2").unwrap();
        let dot = cell_dot(&g, CellKind::Normal);
        // 8 ops, each in and out, + 4 edges into the output.
        assert_eq!(dot.matches("->").count(), 2 * 8 + 4);
        assert!(dot.contains("\"c_{k-2}\" -> \"e0\" -> \"0\""));
        assert!(dot.contains("\"e0\" [label=\"sep_conv_3x3\""));
        assert!(dot.contains("\"0\" -> \"e7\" -> \"3\""));
        assert!(dot.contains("\"e7\" [label=\"dil_conv_3x3\""));
        assert!(dot.contains("\"3\" -> \"c_{k}\""));
        let reduce = cell_dot(&g, CellKind::Reduce);
        assert_eq!(reduce.matches("max_pool_3x3").count(), 5);
    }

    #[test]
    fn terminal_view_places_ops_by_node_and_input() {
        let g = crate::zoo::get("DARTS_V2").unwrap();
        let text = cell_text(&g, CellKind::Normal);
        let row = |n: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.trim_start().starts_with(n)).unwrap();
            line.split_whitespace().map(String::from).collect()
        };
        // node 2 = sep_conv_3x3(c_{k-1}) + skip_connect(c_{k-2}); it may read c_{k-2}, c_{k-1}, 0 and 1.
        assert_eq!(row("node 2"), ["node", "2", "skip_connect", "sep_conv_3x3", "·", "·"]);
        // node 3 = skip_connect(c_{k-2}) + dil_conv_3x3(node 0).
        assert_eq!(row("node 3"), ["node", "3", "skip_connect", "·", "dil_conv_3x3", "·", "·"]);
        assert!(text.contains("concat(0, 1, 2, 3)"));
    }

    #[test]
    fn edge_labels_follow_alpha_rows() {
        let labels = edge_labels(4);
        assert_eq!(labels.len(), 14);
        assert_eq!(labels[0], "c_{k-2} → 0");
        assert_eq!(labels[4], "0 → 1");
        assert_eq!(labels[13], "2 → 3");
    }
}

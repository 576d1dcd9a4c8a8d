//! How decided a derived cell is. Derivation keeps per node the 2 strongest edges and per edge the strongest
//! non-none op; a choice made by a hair could flip with one more epoch. For every choice this measures the
//! margin (kept minus runner-up weight) and how far the weights moved in the last epoch; a choice whose margin is
//! not larger than that movement is "within noise".

use crate::space::{OpKind, SearchSpace};
use serde::{Deserialize, Serialize};

/// The op chosen on one kept edge against the runner-up op of that edge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpChoice {
    /// Intermediate node (0-based).
    pub node: usize,
    /// The edge's input state (0, 1: the previous cells; 2 + i: node i).
    pub input: usize,
    /// The op kept.
    pub op: OpKind,
    /// The strongest other non-none op.
    pub runner_up: OpKind,
    /// Weight of the kept op minus that of the runner-up.
    pub margin: f64,
    /// The largest change of any op's weight on this edge over the last epoch.
    pub moved: f64,
}

/// A node's second kept edge against its strongest dropped edge (nodes with more than 2 inputs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeChoice {
    /// Intermediate node (0-based).
    pub node: usize,
    /// Input of the weaker kept edge.
    pub kept: usize,
    /// Input of the strongest dropped edge.
    pub dropped: usize,
    /// Strength (strongest non-none weight) of the kept edge minus that of the dropped one.
    pub margin: f64,
    /// The larger change of the two strengths over the last epoch.
    pub moved: f64,
}

/// Every choice of one cell.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CellDecision {
    /// One per kept edge.
    pub ops: Vec<OpChoice>,
    /// One per node with a choice of edges.
    pub edges: Vec<EdgeChoice>,
}

/// Both cells' choices.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The normal cell.
    pub normal: CellDecision,
    /// The reduction cell.
    pub reduce: CellDecision,
}

fn strength(row: &[f64], none: Option<usize>) -> (usize, f64) {
    let mut best: Option<usize> = None;
    for (k, &w) in row.iter().enumerate() {
        if Some(k) != none && best.is_none_or(|b| w > row[b]) {
            best = Some(k);
        }
    }
    let b = best.expect("a non-none op exists (validated)");
    (b, row[b])
}

impl CellDecision {
    /// The choices of the cell derived from the derivation weights `now` (a row per edge, as
    /// [`crate::genotype::derive_cell`] reads them), measured against the weights an epoch before, `before`.
    pub fn of(now: &[Vec<f64>], before: &[Vec<f64>], space: &SearchSpace) -> CellDecision {
        let none = space.none_index();
        let mut cell = CellDecision::default();
        let mut start = 0;
        for node in 0..space.nodes {
            let n = 2 + node;
            let rows = &now[start..start + n];
            let prev = &before[start..start + n];
            let mut edges: Vec<usize> = (0..n).collect();
            // The same stable order by descending strength as derivation.
            edges.sort_by(|&a, &b| {
                let (sa, sb) = (strength(&rows[a], none).1, strength(&rows[b], none).1);
                sb.partial_cmp(&sa).unwrap_or(std::cmp::Ordering::Equal)
            });
            for &j in edges.iter().take(2) {
                let (k, w) = strength(&rows[j], none);
                let others: Vec<f64> =
                    rows[j].iter().enumerate().map(|(i, &v)| if i == k { f64::NEG_INFINITY } else { v }).collect();
                let (r, wr) = strength(&others, none);
                if wr.is_finite() {
                    let moved = rows[j].iter().zip(&prev[j]).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                    let (op, runner_up) = (space.ops[k], space.ops[r]);
                    cell.ops.push(OpChoice { node, input: j, op, runner_up, margin: w - wr, moved });
                }
            }
            if n > 2 {
                let (kept, dropped) = (edges[1], edges[2]);
                let s = |rows: &[Vec<f64>], j: usize| strength(&rows[j], none).1;
                let moved = (s(rows, kept) - s(prev, kept)).abs().max((s(rows, dropped) - s(prev, dropped)).abs());
                cell.edges.push(EdgeChoice { node, kept, dropped, margin: s(rows, kept) - s(rows, dropped), moved });
            }
            start += n;
        }
        cell
    }

    /// Kept ops whose margin is not larger than the last epoch's movement.
    pub fn undecided_ops(&self) -> usize {
        self.ops.iter().filter(|c| c.margin <= c.moved).count()
    }

    /// Edge choices whose margin is not larger than the last epoch's movement.
    pub fn undecided_edges(&self) -> usize {
        self.edges.iter().filter(|c| c.margin <= c.moved).count()
    }

    /// One line: how many choices are within noise, and the smallest margins.
    pub fn summary(&self) -> String {
        let min = |v: Vec<f64>| v.into_iter().fold(f64::INFINITY, f64::min);
        let op_min = min(self.ops.iter().map(|c| c.margin).collect());
        let edge_min = min(self.edges.iter().map(|c| c.margin).collect());
        let fmt = |v: f64| if v.is_finite() { format!("{v:.4}") } else { "-".into() };
        format!(
            "{} of {} kept ops and {} of {} edge choices within noise (smallest margins: op {}, edge {})",
            self.undecided_ops(),
            self.ops.len(),
            self.undecided_edges(),
            self.edges.len(),
            fmt(op_min),
            fmt(edge_min)
        )
    }
}

impl Decision {
    /// Both cells' choices from the derivation weights now and an epoch before (normal, reduce).
    pub fn of(
        now: &(Vec<Vec<f64>>, Vec<Vec<f64>>),
        before: &(Vec<Vec<f64>>, Vec<Vec<f64>>),
        space: &SearchSpace,
    ) -> Decision {
        Decision {
            normal: CellDecision::of(&now.0, &before.0, space),
            reduce: CellDecision::of(&now.1, &before.1, space),
        }
    }

    /// Whether every choice of both cells has a margin larger than the last epoch's movement.
    pub fn settled(&self) -> bool {
        [&self.normal, &self.reduce].iter().all(|c| c.undecided_ops() == 0 && c.undecided_edges() == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::OpKind::*;

    /// A 2-node cell over {none, max_pool, skip, sep_conv}, margins worked out by hand.
    #[test]
    fn margins_and_noise_by_hand() {
        let space =
            SearchSpace { ops: vec![None, MaxPool3x3, SkipConnect, SepConv3x3], nodes: 2, ..SearchSpace::default() };
        let now = vec![
            vec![0.10, 0.20, 0.30, 0.40], // node 0, input 0: sep 0.40 over skip 0.30
            vec![0.70, 0.10, 0.15, 0.05], // node 0, input 1: skip 0.15 over max 0.10 (none ignored)
            vec![0.25, 0.25, 0.26, 0.24], // node 1, input 0: strength 0.26 (skip over max by 0.01)
            vec![0.10, 0.50, 0.20, 0.20], // node 1, input 1: strength 0.50 (max over skip/sep by 0.30)
            vec![0.25, 0.25, 0.25, 0.25], // node 1, input 2: strength 0.25, dropped
        ];
        let mut before = now.clone();
        before[2] = vec![0.25, 0.25, 0.25, 0.25]; // moved 0.01 = its margin: within noise
        before[3] = vec![0.10, 0.45, 0.25, 0.20]; // moved 0.05 < margin 0.30
        let c = CellDecision::of(&now, &before, &space);
        assert_eq!(c.ops.len(), 4);
        let o = &c.ops[0];
        assert_eq!((o.node, o.input, o.op, o.runner_up), (0, 0, SepConv3x3, SkipConnect));
        assert!((o.margin - 0.10).abs() < 1e-12 && o.moved == 0.0);
        assert_eq!((c.ops[1].input, c.ops[1].op, c.ops[1].runner_up), (1, SkipConnect, MaxPool3x3));
        assert!((c.ops[1].margin - 0.05).abs() < 1e-12);
        // Node 1 keeps input 1 (0.50) then input 0 (0.26); input 2 (0.25) is dropped by 0.01.
        assert_eq!((c.ops[2].input, c.ops[2].op), (1, MaxPool3x3));
        assert!((c.ops[2].margin - 0.30).abs() < 1e-12 && (c.ops[2].moved - 0.05).abs() < 1e-12);
        assert_eq!((c.ops[3].input, c.ops[3].op, c.ops[3].runner_up), (0, SkipConnect, MaxPool3x3));
        assert!((c.ops[3].margin - 0.01).abs() < 1e-12 && (c.ops[3].moved - 0.01).abs() < 1e-12);
        assert_eq!(c.edges.len(), 1);
        let e = &c.edges[0];
        assert_eq!((e.node, e.kept, e.dropped), (1, 0, 2));
        assert!((e.margin - 0.01).abs() < 1e-12 && (e.moved - 0.01).abs() < 1e-12);
        assert_eq!((c.undecided_ops(), c.undecided_edges()), (1, 1));
        assert!(c.summary().starts_with("1 of 4 kept ops and 1 of 1 edge choices within noise"), "{}", c.summary());
        let d = Decision { normal: c.clone(), reduce: CellDecision::of(&now, &now, &space) };
        assert!(!d.settled());
        // Nothing moved: every choice with a positive margin is decided.
        assert_eq!((d.reduce.undecided_ops(), d.reduce.undecided_edges()), (0, 0));
        assert!(Decision { normal: d.reduce.clone(), reduce: d.reduce.clone() }.settled());
    }
}

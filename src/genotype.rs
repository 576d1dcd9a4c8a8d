//! Genotypes: the discrete cells DARTS derives from alpha, in JSON and in the original DARTS Python text.

use crate::space::{OpKind, SearchSpace};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A discrete architecture: for each intermediate node, two (op, input) pairs, for normal and reduction
/// cells, plus the nodes concatenated into each cell's output. Inputs 0 and 1 are the two previous cells,
/// input `2 + i` is intermediate node `i`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genotype {
    /// Normal cell: two (op, input) pairs per node, node by node.
    pub normal: Vec<(OpKind, usize)>,
    /// States concatenated into the normal cell's output.
    pub normal_concat: Vec<usize>,
    /// Reduction cell: two (op, input) pairs per node.
    pub reduce: Vec<(OpKind, usize)>,
    /// States concatenated into the reduction cell's output.
    pub reduce_concat: Vec<usize>,
}

/// A malformed genotype: where and what.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenotypeError {
    /// Text that does not parse, with its 1-based line and column.
    #[error("genotype text, line {line} column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was expected and found.
        message: String,
    },
    /// Well-formed text that is not a valid cell.
    #[error("invalid genotype: {0}")]
    Invalid(String),
    /// Malformed JSON.
    #[error("genotype JSON: {0}")]
    Json(String),
}

/// Derives one cell from its softmax(alpha) rows: each node keeps the 2 incoming edges whose strongest
/// non-none weight is largest; each kept edge keeps its strongest non-none op (the original `_parse`).
pub fn derive_cell(weights: &[Vec<f64>], space: &SearchSpace) -> Vec<(OpKind, usize)> {
    let none = space.none_index();
    let strongest = |row: &[f64]| -> usize {
        let mut best: Option<usize> = None;
        for (k, &w) in row.iter().enumerate() {
            if Some(k) != none && best.is_none_or(|b| w > row[b]) {
                best = Some(k);
            }
        }
        best.expect("a non-none op exists (validated)")
    };
    let mut gene = Vec::new();
    let mut start = 0;
    for i in 0..space.nodes {
        let n = 2 + i;
        let rows = &weights[start..start + n];
        let mut edges: Vec<usize> = (0..n).collect();
        // A stable sort by descending strength, as Python's sorted(key=-max) is.
        edges.sort_by(|&a, &b| {
            let (wa, wb) = (rows[a][strongest(&rows[a])], rows[b][strongest(&rows[b])]);
            wb.partial_cmp(&wa).unwrap_or(std::cmp::Ordering::Equal)
        });
        for &j in edges.iter().take(2) {
            gene.push((space.ops[strongest(&rows[j])], j));
        }
        start += n;
    }
    gene
}

/// [`derive_cell`] keeping at most `max_skip` `skip_connect` edges, as P-DARTS (Chen et al., ICCV 2019) restricts
/// the normal cell against skip-connection collapse: while the cell has more, the weakest kept `skip_connect` is
/// struck from its edge and the cell derived again, so that edge takes its next-best op, or gives its place to
/// another edge of its node if that is now stronger. A space without `skip_connect` derives as usual.
pub fn derive_cell_limited(weights: &[Vec<f64>], space: &SearchSpace, max_skip: usize) -> Vec<(OpKind, usize)> {
    let Some(skip) = space.ops.iter().position(|&o| o == OpKind::SkipConnect) else {
        return derive_cell(weights, space);
    };
    let mut w = weights.to_vec();
    loop {
        let gene = derive_cell(&w, space);
        let count = gene.iter().filter(|(op, _)| *op == OpKind::SkipConnect).count();
        // Kept skip_connects that can still be struck (an edge whose only real op is skip_connect keeps it).
        let weakest = gene
            .iter()
            .enumerate()
            .filter(|(_, (op, _))| *op == OpKind::SkipConnect)
            .map(|(k, &(_, j))| edge_row(k / 2, j))
            .filter(|&r| w[r][skip].is_finite())
            .min_by(|&a, &b| w[a][skip].partial_cmp(&w[b][skip]).unwrap_or(std::cmp::Ordering::Equal));
        match weakest {
            Some(r) if count > max_skip => w[r][skip] = f64::NEG_INFINITY,
            _ => return gene,
        }
    }
}

/// The row of alpha (and of the softmax weights) that belongs to the edge into intermediate node `node` from state
/// `input`: node i's edges follow those of nodes 0..i, which have 2, 3, ... inputs.
pub fn edge_row(node: usize, input: usize) -> usize {
    (0..node).map(|k| 2 + k).sum::<usize>() + input
}

/// The number of `skip_connect` edges in a cell.
pub fn skip_connects(cell: &[(OpKind, usize)]) -> usize {
    cell.iter().filter(|(op, _)| *op == OpKind::SkipConnect).count()
}

impl Genotype {
    /// Derives the genotype from softmax(alpha) of normal and reduction cells.
    pub fn derive(normal: &[Vec<f64>], reduce: &[Vec<f64>], space: &SearchSpace) -> Genotype {
        Genotype::derive_limited(normal, reduce, space, None)
    }

    /// [`Genotype::derive`] with at most `max_skip` `skip_connect` edges in the normal cell (P-DARTS's rule, see
    /// [`derive_cell_limited`]); `None` derives as DARTS does.
    pub fn derive_limited(
        normal: &[Vec<f64>],
        reduce: &[Vec<f64>],
        space: &SearchSpace,
        max_skip: Option<usize>,
    ) -> Genotype {
        let concat: Vec<usize> = (2..2 + space.nodes).collect();
        Genotype {
            normal: match max_skip {
                Some(m) => derive_cell_limited(normal, space, m),
                None => derive_cell(normal, space),
            },
            normal_concat: concat.clone(),
            reduce: derive_cell(reduce, space),
            reduce_concat: concat,
        }
    }

    /// Number of intermediate nodes per cell.
    pub fn nodes(&self) -> usize {
        self.normal.len() / 2
    }

    /// Checks the cell structure, naming the first problem.
    pub fn validate(&self) -> Result<(), GenotypeError> {
        for (name, cell, concat) in
            [("normal", &self.normal, &self.normal_concat), ("reduce", &self.reduce, &self.reduce_concat)]
        {
            if cell.is_empty() || cell.len() % 2 != 0 {
                return Err(GenotypeError::Invalid(format!(
                    "{name} has {} (op, input) pairs; it needs two per intermediate node",
                    cell.len()
                )));
            }
            for (k, &(op, input)) in cell.iter().enumerate() {
                let node = k / 2;
                if input >= 2 + node {
                    return Err(GenotypeError::Invalid(format!(
                        "{name}[{k}] = ('{op}', {input}): node {node} can only take inputs 0..={}",
                        1 + node
                    )));
                }
                if op == OpKind::None {
                    return Err(GenotypeError::Invalid(format!("{name}[{k}] is 'none': a kept edge needs a real op")));
                }
            }
            let states = 2 + cell.len() / 2;
            if concat.is_empty() {
                return Err(GenotypeError::Invalid(format!("{name}_concat is empty")));
            }
            for (k, &c) in concat.iter().enumerate() {
                if c < 2 || c >= states || concat[..k].contains(&c) {
                    return Err(GenotypeError::Invalid(format!(
                        "{name}_concat has {c}: entries must be distinct intermediate nodes 2..{}",
                        states - 1
                    )));
                }
            }
        }
        if self.normal.len() != self.reduce.len() {
            return Err(GenotypeError::Invalid(format!(
                "normal has {} nodes but reduce has {}",
                self.normal.len() / 2,
                self.reduce.len() / 2
            )));
        }
        Ok(())
    }

    /// Parses and validates JSON (`{"normal": [["sep_conv_3x3", 0], ...], "normal_concat": [2, 3, 4, 5], ...}`).
    pub fn from_json(text: &str) -> Result<Genotype, GenotypeError> {
        let g: Genotype = serde_json::from_str(text).map_err(|e| GenotypeError::Json(e.to_string()))?;
        g.validate()?;
        Ok(g)
    }

    /// As pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a genotype serialises")
    }

    /// Parses and validates the original DARTS Python text, `Genotype(normal=[('sep_conv_3x3', 0), ...], ...)`.
    pub fn from_python(text: &str) -> Result<Genotype, GenotypeError> {
        let g = Parser { s: text.as_bytes(), pos: 0, text }.genotype()?;
        g.validate()?;
        Ok(g)
    }

    /// Parses JSON or Python text, whichever `text` is.
    pub fn parse(text: &str) -> Result<Genotype, GenotypeError> {
        if text.trim_start().starts_with('{') {
            Genotype::from_json(text)
        } else {
            Genotype::from_python(text)
        }
    }
}

impl fmt::Display for Genotype {
    /// The original DARTS Python text.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cell =
            |c: &[(OpKind, usize)]| c.iter().map(|(op, i)| format!("('{op}', {i})")).collect::<Vec<_>>().join(", ");
        let list = |c: &[usize]| c.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        write!(
            f,
            "Genotype(normal=[{}], normal_concat=[{}], reduce=[{}], reduce_concat=[{}])",
            cell(&self.normal),
            list(&self.normal_concat),
            cell(&self.reduce),
            list(&self.reduce_concat)
        )
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn err<T>(&self, message: impl Into<String>) -> Result<T, GenotypeError> {
        let before = &self.text[..self.pos.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        Err(GenotypeError::Syntax { line, column, message: message.into() })
    }

    fn found(&self) -> String {
        match self.s.get(self.pos) {
            None => "end of text".into(),
            Some(_) => {
                let rest: String = self.text[self.pos..].chars().take(12).collect();
                format!("'{rest}'")
            }
        }
    }

    fn ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.text[self.pos..].starts_with(tok) {
            self.pos += tok.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, tok: &str) -> Result<(), GenotypeError> {
        if self.eat(tok) {
            Ok(())
        } else {
            self.err(format!("expected '{tok}', found {}", self.found()))
        }
    }

    fn ident(&mut self) -> Result<String, GenotypeError> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len() && (self.s[self.pos].is_ascii_alphanumeric() || self.s[self.pos] == b'_') {
            self.pos += 1;
        }
        if start == self.pos {
            return self.err(format!("expected a name, found {}", self.found()));
        }
        Ok(self.text[start..self.pos].to_string())
    }

    fn int(&mut self) -> Result<usize, GenotypeError> {
        self.ws();
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        if start == self.pos {
            return self.err(format!("expected a non-negative integer, found {}", self.found()));
        }
        match self.text[start..self.pos].parse() {
            Ok(v) => Ok(v),
            Err(_) => {
                self.pos = start;
                self.err("integer too large")
            }
        }
    }

    fn string(&mut self) -> Result<(String, usize), GenotypeError> {
        self.ws();
        let at = self.pos;
        let quote = match self.s.get(self.pos) {
            Some(b'\'') => "'",
            Some(b'"') => "\"",
            _ => return self.err(format!("expected a quoted op name, found {}", self.found())),
        };
        self.pos += 1;
        match self.text[self.pos..].find(quote) {
            Some(end) => {
                let v = self.text[self.pos..self.pos + end].to_string();
                self.pos += end + 1;
                Ok((v, at))
            }
            None => self.err("unterminated string"),
        }
    }

    fn cell(&mut self) -> Result<Vec<(OpKind, usize)>, GenotypeError> {
        self.expect("[")?;
        let mut out = Vec::new();
        if self.eat("]") {
            return Ok(out);
        }
        loop {
            self.expect("(")?;
            let (name, at) = self.string()?;
            let op = match name.parse::<OpKind>() {
                Ok(op) => op,
                Err(e) => {
                    self.pos = at;
                    return self.err(e.to_string());
                }
            };
            self.expect(",")?;
            let input = self.int()?;
            self.expect(")")?;
            out.push((op, input));
            if self.eat("]") {
                return Ok(out);
            }
            self.expect(",")?;
            if self.eat("]") {
                return Ok(out);
            }
        }
    }

    fn concat(&mut self) -> Result<Vec<usize>, GenotypeError> {
        if self.eat("range") {
            self.expect("(")?;
            let a = self.int()?;
            self.expect(",")?;
            let b = self.int()?;
            self.expect(")")?;
            if b <= a {
                return self.err(format!("range({a}, {b}) is empty"));
            }
            return Ok((a..b).collect());
        }
        self.expect("[")?;
        let mut out = Vec::new();
        if self.eat("]") {
            return Ok(out);
        }
        loop {
            out.push(self.int()?);
            if self.eat("]") {
                return Ok(out);
            }
            self.expect(",")?;
        }
    }

    fn genotype(&mut self) -> Result<Genotype, GenotypeError> {
        self.expect("Genotype")?;
        self.expect("(")?;
        let (mut normal, mut normal_concat, mut reduce, mut reduce_concat) = (None, None, None, None);
        loop {
            let key_at = {
                self.ws();
                self.pos
            };
            let key = self.ident()?;
            self.expect("=")?;
            match key.as_str() {
                "normal" => normal = Some(self.cell()?),
                "reduce" => reduce = Some(self.cell()?),
                "normal_concat" => normal_concat = Some(self.concat()?),
                "reduce_concat" => reduce_concat = Some(self.concat()?),
                other => {
                    self.pos = key_at;
                    return self.err(format!(
                        "unknown field '{other}'; a Genotype has normal, normal_concat, reduce, reduce_concat"
                    ));
                }
            }
            if self.eat(")") {
                break;
            }
            self.expect(",")?;
            if self.eat(")") {
                break;
            }
        }
        self.ws();
        if self.pos != self.s.len() {
            return self.err(format!("unexpected text after the genotype: {}", self.found()));
        }
        match (normal, normal_concat, reduce, reduce_concat) {
            (Some(normal), Some(normal_concat), Some(reduce), Some(reduce_concat)) => {
                Ok(Genotype { normal, normal_concat, reduce, reduce_concat })
            }
            _ => self.err("missing field: a Genotype needs normal, normal_concat, reduce and reduce_concat"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])";

    #[test]
    fn python_text_round_trips_exactly() {
        let g = Genotype::from_python(V2).unwrap();
        assert_eq!(g.normal.len(), 8);
        assert_eq!(g.normal[7], (OpKind::DilConv3x3, 2));
        assert_eq!(g.to_string(), V2);
        assert_eq!(Genotype::from_json(&g.to_json()).unwrap(), g);
    }

    #[test]
    fn range_concat_and_double_quotes_parse() {
        let t = V2.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=range(2, 6)").replace('\'', "\"");
        let g = Genotype::from_python(&t).unwrap();
        assert_eq!(g.normal_concat, vec![2, 3, 4, 5]);
    }

    #[test]
    fn malformed_text_names_position_and_problem() {
        let bad = V2.replace("('sep_conv_3x3', 1), ('sep_conv_3x3', 1)", "('sep_conv_3x3', 1), ('sep_conv_9x9', 1)");
        let e = Genotype::from_python(&bad).unwrap_err().to_string();
        assert!(e.contains("sep_conv_9x9") && e.contains("column"), "{e}");
        let col = V2.find("('sep_conv_3x3', 1), ('sep_conv_3x3', 1)").unwrap() + "('sep_conv_3x3', 1), (".len() + 1;
        assert!(e.contains(&format!("column {col}")), "{e} (want column {col})");
        let e = Genotype::from_python("Genotype(normal=[('sep_conv_3x3' 0)])").unwrap_err().to_string();
        assert!(e.contains("expected ','"), "{e}");
        let e = Genotype::from_python("Genotype(normal=[], normal_concat=[2])").unwrap_err().to_string();
        assert!(e.contains("missing field"), "{e}");
        let e = Genotype::from_python(&V2.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', 7)")).unwrap_err();
        assert!(e.to_string().contains("normal[7]"), "{e}");
        assert!(Genotype::from_json("{\"normal\": 3}").is_err());
    }

    #[test]
    fn derivation_follows_the_original_rule_on_a_hand_made_case() {
        let space = SearchSpace {
            ops: vec![OpKind::None, OpKind::SkipConnect, OpKind::SepConv3x3],
            nodes: 2,
            ..Default::default()
        };
        // Node 0: edges from 0 and 1. Node 1: edges from 0, 1, 2. 'none' is strongest everywhere but ignored.
        let w = vec![
            vec![0.90, 0.04, 0.06], // edge 0->n0: best non-none sep (0.06)
            vec![0.50, 0.30, 0.20], // edge 1->n0: best skip (0.30)
            vec![0.80, 0.15, 0.05], // edge 0->n1: 0.15
            vec![0.70, 0.10, 0.20], // edge 1->n1: 0.20
            vec![0.40, 0.35, 0.25], // edge 2->n1: 0.35
        ];
        let cell = derive_cell(&w, &space);
        assert_eq!(
            cell,
            vec![(OpKind::SkipConnect, 1), (OpKind::SepConv3x3, 0), (OpKind::SkipConnect, 2), (OpKind::SepConv3x3, 1)]
        );
    }

    #[test]
    fn the_skip_limit_strikes_the_weakest_kept_skip_and_derives_again() {
        let space = SearchSpace {
            ops: vec![OpKind::None, OpKind::SkipConnect, OpKind::SepConv3x3],
            nodes: 2,
            ..Default::default()
        };
        // Rows: node 0 from states 0, 1; node 1 from states 0, 1, 2. Columns: none, skip, sep.
        let w = vec![
            vec![0.1, 0.6, 0.3],
            vec![0.1, 0.5, 0.4],
            vec![0.1, 0.7, 0.2],
            vec![0.1, 0.2, 0.65],
            vec![0.2, 0.55, 0.25],
        ];
        let (skip, sep) = (OpKind::SkipConnect, OpKind::SepConv3x3);
        // Unrestricted: node 0 keeps skips from 0 and 1; node 1 keeps the skip from 0 (0.7) and the sep from 1.
        assert_eq!(derive_cell(&w, &space), vec![(skip, 0), (skip, 1), (skip, 0), (sep, 1)]);
        assert_eq!(derive_cell_limited(&w, &space, 3), derive_cell(&w, &space));
        // At most 2: the weakest kept skip (0.5, node 0 from 1) goes; that edge keeps its sep (0.4).
        assert_eq!(derive_cell_limited(&w, &space, 2), vec![(skip, 0), (sep, 1), (skip, 0), (sep, 1)]);
        // At most 1: next the skip of 0.6 goes; node 0's edges re-rank (sep 0.4 from 1 before sep 0.3 from 0).
        assert_eq!(derive_cell_limited(&w, &space, 1), vec![(sep, 1), (sep, 0), (skip, 0), (sep, 1)]);
        // None: striking node 1's skip from 0 (0.7) lets the skip from 2 (0.55) in; it is struck too.
        assert_eq!(derive_cell_limited(&w, &space, 0), vec![(sep, 1), (sep, 0), (sep, 1), (sep, 2)]);
        assert_eq!(skip_connects(&derive_cell_limited(&w, &space, 0)), 0);
        // Only the normal cell is restricted.
        let g = Genotype::derive_limited(&w, &w, &space, Some(0));
        assert_eq!(skip_connects(&g.normal), 0);
        assert_eq!(skip_connects(&g.reduce), 3);
    }

    #[test]
    fn an_edge_whose_only_real_op_is_skip_keeps_it() {
        let space = SearchSpace { ops: vec![OpKind::None, OpKind::SkipConnect], nodes: 1, ..Default::default() };
        let w = vec![vec![0.2, 0.8], vec![0.4, 0.6]];
        let g = derive_cell_limited(&w, &space, 0);
        assert_eq!(g, derive_cell(&w, &space), "nothing else to choose: the limit cannot apply");
    }
}

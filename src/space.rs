//! The search space as data: the candidate operations, the cell shape and the macro shape.
//!
//! Everything downstream (the supernet, derivation, genotypes, the final network) reads one [`SearchSpace`]
//! value, which can be printed, saved as TOML or JSON, and loaded back.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Errors in a search space or a dataset shape, each saying what is wrong and how to fix it.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpaceError {
    /// An op name that is not in the op table.
    #[error("unknown operation '{0}'; known operations: {known}", known = OpKind::ALL.iter().map(|o| o.name()).collect::<Vec<_>>().join(", "))]
    UnknownOp(String),
    /// A value outside its allowed range.
    #[error("{0}")]
    Invalid(String),
}

/// One candidate operation on an edge, named as in the original DARTS code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum OpKind {
    /// `none`: the zero op (strided when the edge reduces).
    None,
    /// `max_pool_3x3`.
    MaxPool3x3,
    /// `avg_pool_3x3` (count_include_pad = false).
    AvgPool3x3,
    /// `skip_connect`: identity, or FactorizedReduce when the edge reduces.
    SkipConnect,
    /// `sep_conv_3x3`: twice ReLU-depthwise-pointwise-BN.
    SepConv3x3,
    /// `sep_conv_5x5`.
    SepConv5x5,
    /// `sep_conv_7x7`.
    SepConv7x7,
    /// `dil_conv_3x3`: ReLU, depthwise 3x3 with dilation 2, pointwise, BN.
    DilConv3x3,
    /// `dil_conv_5x5`.
    DilConv5x5,
    /// `conv_7x1_1x7`: ReLU, 1x7 conv, 7x1 conv, BN.
    Conv7x1_1x7,
}

impl OpKind {
    /// Every op in the table.
    pub const ALL: [OpKind; 10] = [
        OpKind::None,
        OpKind::MaxPool3x3,
        OpKind::AvgPool3x3,
        OpKind::SkipConnect,
        OpKind::SepConv3x3,
        OpKind::SepConv5x5,
        OpKind::SepConv7x7,
        OpKind::DilConv3x3,
        OpKind::DilConv5x5,
        OpKind::Conv7x1_1x7,
    ];

    /// The DARTS candidate set, in the order of the original `PRIMITIVES`.
    pub const DARTS: [OpKind; 8] = [
        OpKind::None,
        OpKind::MaxPool3x3,
        OpKind::AvgPool3x3,
        OpKind::SkipConnect,
        OpKind::SepConv3x3,
        OpKind::SepConv5x5,
        OpKind::DilConv3x3,
        OpKind::DilConv5x5,
    ];

    /// The name used by the original code and in genotypes.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::None => "none",
            OpKind::MaxPool3x3 => "max_pool_3x3",
            OpKind::AvgPool3x3 => "avg_pool_3x3",
            OpKind::SkipConnect => "skip_connect",
            OpKind::SepConv3x3 => "sep_conv_3x3",
            OpKind::SepConv5x5 => "sep_conv_5x5",
            OpKind::SepConv7x7 => "sep_conv_7x7",
            OpKind::DilConv3x3 => "dil_conv_3x3",
            OpKind::DilConv5x5 => "dil_conv_5x5",
            OpKind::Conv7x1_1x7 => "conv_7x1_1x7",
        }
    }

    /// Whether this op is a pooling op (followed by BN during search, as in the original).
    pub fn is_pool(self) -> bool {
        matches!(self, OpKind::MaxPool3x3 | OpKind::AvgPool3x3)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for OpKind {
    type Err = SpaceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OpKind::ALL.iter().copied().find(|o| o.name() == s).ok_or_else(|| SpaceError::UnknownOp(s.to_string()))
    }
}

impl TryFrom<String> for OpKind {
    type Error = SpaceError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<OpKind> for String {
    fn from(o: OpKind) -> String {
        o.name().to_string()
    }
}

/// The nonlinearity inside ops and preprocessing. DARTS uses ReLU; GELU makes the network smooth, so
/// second derivatives (the unrolled hypergradient's Hessian term) have no kinks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// max(0, x), as the original.
    #[default]
    Relu,
    /// x * Phi(x).
    Gelu,
}

impl Activation {
    /// Applies the nonlinearity.
    pub fn apply(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => x.gelu("none"),
        }
    }
}

/// The shape of the data a network sees: input channels, image size and number of classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataShape {
    /// Input channels (1 for grayscale, 3 for colour).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
}

/// A DARTS search space: candidate ops, cell shape and macro shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchSpace {
    /// Candidate operations on every edge, in alpha column order.
    pub ops: Vec<OpKind>,
    /// Intermediate nodes per cell.
    pub nodes: usize,
    /// Number of cells in the supernet.
    pub layers: usize,
    /// Initial channels C.
    pub channels: usize,
    /// The stem outputs `stem_multiplier * channels` channels.
    pub stem_multiplier: usize,
    /// The nonlinearity in ops and preprocessing.
    pub activation: Activation,
    /// PC-DARTS partial channel connections: every edge's candidate ops see only 1/K of the channels (the
    /// rest bypass them), followed by a channel shuffle. 1 (the default) is plain DARTS; PC-DARTS uses 4.
    pub partial_channels: usize,
    /// PC-DARTS edge normalisation: a second set of architecture weights (beta), one per edge, softmax over
    /// each node's incoming edges, weighting the edges' sum and the ranking of edges at derivation.
    pub edge_normalization: bool,
    /// DARTS- (Chu et al., ICLR 2021): an auxiliary skip connection on every edge, added to the relaxed ops
    /// with a weight that a search decays linearly from 1 (identity, or FactorizedReduce with its own weights
    /// on a reducing edge). It carries the gradient that otherwise makes skip_connect's alpha win.
    pub auxiliary_skip: bool,
}

impl Default for SearchSpace {
    fn default() -> Self {
        SearchSpace {
            ops: OpKind::DARTS.to_vec(),
            nodes: 4,
            layers: 8,
            channels: 16,
            stem_multiplier: 3,
            activation: Activation::Relu,
            partial_channels: 1,
            edge_normalization: false,
            auxiliary_skip: false,
        }
    }
}

impl SearchSpace {
    /// Number of edges in one cell: node i has 2 + i incoming edges.
    pub fn edges(&self) -> usize {
        (0..self.nodes).map(|i| 2 + i).sum()
    }

    /// Whether cell `layer` is a reduction cell (at 1/3 and 2/3 of the depth, as the original).
    pub fn is_reduction(&self, layer: usize) -> bool {
        layer == self.layers / 3 || layer == 2 * self.layers / 3
    }

    /// Number of reduction cells.
    pub fn reductions(&self) -> usize {
        (0..self.layers).filter(|&l| self.is_reduction(l)).count()
    }

    /// Parses a comma-separated op list such as `none,skip_connect,sep_conv_3x3`.
    pub fn parse_ops(list: &str) -> Result<Vec<OpKind>, SpaceError> {
        list.split(',').map(|s| s.trim()).filter(|s| !s.is_empty()).map(str::parse).collect()
    }

    /// Loads a space from TOML text (missing keys take the defaults).
    pub fn from_toml(text: &str) -> Result<Self, SpaceError> {
        let space: SearchSpace =
            toml::from_str(text).map_err(|e| SpaceError::Invalid(format!("search space TOML: {e}")))?;
        space.validate()?;
        Ok(space)
    }

    /// Checks the space itself.
    pub fn validate(&self) -> Result<(), SpaceError> {
        let bad = |m: String| Err(SpaceError::Invalid(m));
        if self.ops.is_empty() {
            return bad("the op set is empty: give at least one operation besides 'none'".into());
        }
        if !self.ops.iter().any(|&o| o != OpKind::None) {
            return bad("the op set has only 'none': derivation needs at least one other operation".into());
        }
        let mut seen = self.ops.clone();
        seen.sort();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("operation '{}' is listed twice in the op set", w[0]));
        }
        if self.nodes < 1 || self.nodes > 16 {
            return bad(format!("nodes = {}: a cell needs 1 to 16 intermediate nodes (DARTS uses 4)", self.nodes));
        }
        if self.layers < 1 || self.layers > 100 {
            return bad(format!("layers = {}: use 1 to 100 cells (DARTS searches with 8)", self.layers));
        }
        if self.channels < 2 || !self.channels.is_multiple_of(2) || self.channels > 4096 {
            return bad(format!(
                "channels = {}: initial channels must be even (FactorizedReduce halves them) and between 2 and 4096",
                self.channels
            ));
        }
        let k = self.partial_channels;
        if k < 1 || !self.channels.is_multiple_of(2 * k) {
            return bad(format!(
                "partial_channels = {k} with channels = {}: each edge's ops see channels/partial_channels channels, \
                 which must be a whole, even number (e.g. partial_channels = 4 with channels = 16; 1 turns it off)",
                self.channels
            ));
        }
        if self.stem_multiplier < 1 || self.stem_multiplier > 16 {
            return bad(format!("stem_multiplier = {}: use 1 to 16 (DARTS uses 3)", self.stem_multiplier));
        }
        Ok(())
    }

    /// Checks that data of this shape can flow through the space's reductions.
    pub fn validate_for(&self, data: &DataShape) -> Result<(), SpaceError> {
        self.validate()?;
        if data.channels == 0 || data.classes < 2 {
            return Err(SpaceError::Invalid(format!(
                "the dataset has {} input channels and {} classes: need at least 1 channel and 2 classes",
                data.channels, data.classes
            )));
        }
        let min = 1usize << self.reductions();
        if data.height < min || data.width < min {
            return Err(SpaceError::Invalid(format!(
                "images of {}x{} are too small for {} reduction cells (need at least {min}x{min})",
                data.height,
                data.width,
                self.reductions()
            )));
        }
        Ok(())
    }

    /// The index of `none` in the op set, if present.
    pub fn none_index(&self) -> Option<usize> {
        self.ops.iter().position(|&o| o == OpKind::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_space_has_fourteen_edges_and_reductions_at_thirds() {
        let s = SearchSpace::default();
        assert_eq!(s.edges(), 14);
        let red: Vec<usize> = (0..8).filter(|&l| s.is_reduction(l)).collect();
        assert_eq!(red, vec![2, 5]);
    }

    #[test]
    fn op_names_round_trip_and_unknown_names_are_rejected() {
        for op in OpKind::ALL {
            assert_eq!(op.name().parse::<OpKind>().unwrap(), op);
        }
        let err = "sep_conv_9x9".parse::<OpKind>().unwrap_err();
        assert!(err.to_string().contains("sep_conv_9x9"));
        assert!(err.to_string().contains("known operations"));
    }

    #[test]
    fn invalid_spaces_say_what_is_wrong() {
        let s = SearchSpace { channels: 15, ..Default::default() };
        assert!(s.validate().unwrap_err().to_string().contains("even"));
        let s = SearchSpace { ops: vec![OpKind::None], ..Default::default() };
        assert!(s.validate().unwrap_err().to_string().contains("only 'none'"));
        let s = SearchSpace { ops: vec![OpKind::SkipConnect, OpKind::SkipConnect], ..Default::default() };
        assert!(s.validate().unwrap_err().to_string().contains("twice"));
        let s = SearchSpace { nodes: 0, ..Default::default() };
        assert!(s.validate().is_err());
        let shape = DataShape { channels: 1, height: 2, width: 2, classes: 10 };
        assert!(SearchSpace::default().validate_for(&shape).unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn toml_loads_with_defaults_and_rejects_unknown_keys() {
        let s = SearchSpace::from_toml("ops = ['none', 'skip_connect', 'sep_conv_3x3']\nnodes = 3\n").unwrap();
        assert_eq!(s.ops.len(), 3);
        assert_eq!(s.nodes, 3);
        assert_eq!(s.layers, 8);
        assert!(!s.auxiliary_skip);
        // The README's example.
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let start = readme.find("```toml\n").expect("a TOML example") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let example = SearchSpace::from_toml(&readme[start..end]).unwrap();
        assert_eq!(example, SearchSpace::default());
        let aux = SearchSpace::from_toml("auxiliary_skip = true").unwrap();
        assert!(aux.auxiliary_skip && aux.validate().is_ok());
        assert!(SearchSpace::from_toml("nodez = 3").is_err());
        assert!(SearchSpace::from_toml("ops = ['conv_9x9']").unwrap_err().to_string().contains("conv_9x9"));
    }
}

//! The records of a run directory: a line of `metrics.jsonl` per epoch (search, training), of `samples.jsonl` per
//! sample (baselines), and a comparison's outcome.

use crate::genotype::Genotype;
use crate::space::SearchSpace;
use serde::{Deserialize, Serialize};

/// Per-epoch results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochStats {
    /// 0-based epoch.
    pub epoch: usize,
    /// Weights' learning rate this epoch.
    pub lr: f64,
    /// Mean training loss (weight split, training mode).
    pub train_loss: f64,
    /// Training accuracy.
    pub train_acc: f64,
    /// Loss on the alpha split (evaluation mode).
    pub val_loss: f64,
    /// Accuracy on the alpha split.
    pub val_acc: f64,
    /// softmax(alpha_normal) per edge.
    pub alpha_normal: Vec<Vec<f64>>,
    /// softmax(alpha_reduce) per edge.
    pub alpha_reduce: Vec<Vec<f64>>,
    /// Edge normalisation only: each normal-cell edge's weight (softmax of beta over its node's edges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_normal: Option<Vec<f64>>,
    /// Edge normalisation only: each reduction-cell edge's weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_reduce: Option<Vec<f64>>,
    /// The genotype derived at the end of the epoch (records of earlier darts versions hold it as DARTS Python
    /// text; both load).
    #[serde(with = "genotype_field")]
    pub genotype: Genotype,
    /// Wall-clock seconds of the epoch.
    pub seconds: f64,
    /// Peak resident memory of the process so far, MiB.
    pub peak_rss_mb: f64,
    /// Seconds the training loop waited for the data loader this epoch.
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// On CUDA: the most memory tensors held at once during the epoch (the caching allocator's peak), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_mb: Option<f64>,
    /// The skip dropout rate of this epoch, when the search uses skip dropout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_dropout: Option<f64>,
    /// The weight of the auxiliary skip connections this epoch, when the space has them (DARTS-).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aux_skip: Option<f64>,
    /// GDAS: this epoch's Gumbel-softmax temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdas_tau: Option<f64>,
    /// Second order: the weights' learning rate of this epoch's unrolled steps (the original passes the epoch's
    /// `lr` to `architect.step`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrolled_lr: Option<f64>,
    /// A data-parallel search: seconds rank 0 spent in collectives this epoch (their share of `seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

impl EpochStats {
    /// The genotype derived from this epoch's architecture weights, with at most `max_skip` skip connections in
    /// the normal cell (`None`: as DARTS derives).
    pub fn derive(&self, space: &SearchSpace, max_skip: Option<usize>) -> Genotype {
        let betas = self.beta_normal.clone().zip(self.beta_reduce.clone());
        let (n, r) = crate::supernet::derivation_weights(self.alpha_normal.clone(), self.alpha_reduce.clone(), betas);
        Genotype::derive_limited(&n, &r, space, max_skip)
    }
}

/// The derivation weights before any alpha step (alpha and beta start near 0, so softmax is uniform): what the
/// first epoch's movement is measured from.
pub fn initial_derivation_weights(space: &SearchSpace) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let k = space.ops.len() as f64;
    let rows: Vec<Vec<f64>> = (0..space.nodes)
        .flat_map(|i| {
            let edge = if space.edge_normalization { 1.0 / (2 + i) as f64 } else { 1.0 };
            (0..2 + i).map(move |_| vec![edge / k; space.ops.len()])
        })
        .collect();
    (rows.clone(), rows)
}

/// How decided the cell derived after the last of `epochs` (a search's metrics, in order) is: its choices'
/// margins against the movement over that epoch. None before the first epoch.
pub fn decision(space: &SearchSpace, epochs: &[EpochStats]) -> Option<crate::decision::Decision> {
    let last = epochs.last()?;
    let rows = |e: &EpochStats| {
        let betas = e.beta_normal.clone().zip(e.beta_reduce.clone());
        crate::supernet::derivation_weights(e.alpha_normal.clone(), e.alpha_reduce.clone(), betas)
    };
    let before = match epochs.len() {
        1 => initial_derivation_weights(space),
        n => rows(&epochs[n - 2]),
    };
    Some(crate::decision::Decision::of(&rows(last), &before, space))
}

/// Per-epoch results of training.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainStats {
    /// 0-based epoch.
    pub epoch: usize,
    /// Learning rate.
    pub lr: f64,
    /// Drop-path probability.
    pub drop_path: f64,
    /// Mean training loss (main head).
    pub train_loss: f64,
    /// Training accuracy.
    pub train_acc: f64,
    /// Loss on the held-out validation split (with `valid_portion` > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_loss: Option<f64>,
    /// Accuracy on the validation split: what chooses `model-best`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_acc: Option<f64>,
    /// Test loss.
    pub test_loss: f64,
    /// Test top-1 accuracy.
    pub test_acc: f64,
    /// Test top-5 accuracy (when there are more than 5 classes).
    pub test_top5: Option<f64>,
    /// Seconds.
    pub seconds: f64,
    /// Peak RSS, MiB.
    pub peak_rss_mb: f64,
    /// Seconds the training loop waited for the data loader this epoch.
    #[serde(default)]
    pub data_wait_seconds: f64,
    /// On CUDA: the most memory tensors held at once during the epoch (the caching allocator's peak), MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_mb: Option<f64>,
    /// A data-parallel training: seconds rank 0 spent in collectives this epoch (their share of `seconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

/// The model `model-best` holds: chosen on the held-out validation split, never on the test set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// 0-based epoch after which the weights were saved.
    pub epoch: usize,
    /// Its validation accuracy.
    pub valid_acc: f64,
}

/// One evaluated architecture: a line of `samples.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleRecord {
    /// 0-based sample index.
    pub index: usize,
    /// The genotype (earlier records: DARTS Python text; both load).
    #[serde(with = "genotype_field")]
    pub genotype: Genotype,
    /// Accuracy on the scoring split after training: the reward.
    pub val_acc: f64,
    /// Loss on the scoring split.
    pub val_loss: f64,
    /// Parameters of the sampled network.
    pub parameters: i64,
    /// Seconds spent on this sample (training and scoring).
    pub seconds: f64,
    /// Seconds since the run started, this sample included (interruptions excluded).
    pub total_seconds: f64,
    /// RL: the moving-average baseline before this sample's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// RL: the policy's entropy before this sample's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<f64>,
}

/// A search method of a comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// DARTS's bilevel search.
    Darts,
    /// Random search.
    Random,
    /// REINFORCE.
    Rl,
}

impl Method {
    /// The name in tables, figures and folder names.
    pub fn name(self) -> &'static str {
        match self {
            Method::Darts => "darts",
            Method::Random => "random",
            Method::Rl => "rl",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One method's line of the table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MethodResult {
    /// darts, random or rl.
    pub method: Method,
    /// Seconds the search took.
    pub search_seconds: f64,
    /// Architectures trained during the search (DARTS: one supernet).
    pub architectures_trained: usize,
    /// The found cell (earlier records: DARTS Python text; both load).
    #[serde(with = "genotype_field")]
    pub genotype: Genotype,
    /// Parameters of the final network (auxiliary head excluded).
    pub parameters: i64,
    /// Test top-1 after the final training.
    pub test_top1: f64,
    /// Seconds the final training took.
    pub train_seconds: f64,
}

/// The comparison's results, also written as `compare.json` and `compare.md`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareOutcome {
    /// One line per method: darts, random, rl.
    pub methods: Vec<MethodResult>,
    /// The device.
    pub device: String,
}

/// A genotype in a record: written as its JSON object, read from that or from the DARTS Python text that
/// records of earlier darts versions hold.
mod genotype_field {
    use crate::genotype::Genotype;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(g: &Genotype, s: S) -> Result<S::Ok, S::Error> {
        g.serialize(s)
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Typed(Genotype),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Genotype, D::Error> {
        let g = match Either::deserialize(d)? {
            Either::Text(t) => Genotype::parse(&t).map_err(serde::de::Error::custom)?,
            Either::Typed(g) => g,
        };
        g.validate().map_err(serde::de::Error::custom)?;
        Ok(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record holds its genotype as a typed value; a record of an earlier version (Python text) still loads,
    /// and a malformed one is an error that says what is wrong.
    #[test]
    fn records_hold_typed_genotypes_and_read_the_older_text() {
        let g = crate::zoo::get("DARTS_V2").unwrap();
        let rec = SampleRecord {
            index: 0,
            genotype: g.clone(),
            val_acc: 0.5,
            val_loss: 1.0,
            parameters: 10,
            seconds: 1.0,
            total_seconds: 1.0,
            baseline: None,
            entropy: None,
        };
        let line = serde_json::to_value(&rec).unwrap();
        assert_eq!(line["genotype"]["normal"][0], serde_json::json!(["sep_conv_3x3", 0]));
        let back: SampleRecord = serde_json::from_value(line.clone()).unwrap();
        assert_eq!(back.genotype, g);
        let mut old = line.clone();
        old["genotype"] = serde_json::Value::String(g.to_string());
        assert_eq!(serde_json::from_value::<SampleRecord>(old).unwrap().genotype, g);
        let mut bad = line;
        bad["genotype"] = serde_json::Value::String("Genotype(normal=[('sep_conv_3x3' 0)])".into());
        let e = serde_json::from_value::<SampleRecord>(bad).unwrap_err().to_string();
        assert!(e.contains("line 1 column"), "{e}");
    }
}

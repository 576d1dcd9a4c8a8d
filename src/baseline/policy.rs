//! The RL baseline's policy: a categorical distribution per decision of a cell (each node's pair of inputs and
//! its two ops), sampled into genotypes, with REINFORCE's gradient and its own Adam.
use crate::genotype::Genotype;
use crate::space::{OpKind, SearchSpace};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// The decisions that make a genotype: per cell (normal, reduce), per node, the pair of inputs and two ops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// One row of logits per decision: per cell (normal, then reduce), per node, its input pair, then its two ops.
    pub logits: Vec<Vec<f64>>,
    /// The ops a kept edge may carry (the space's ops without `none`).
    pub ops: Vec<OpKind>,
    /// Intermediate nodes per cell.
    pub nodes: usize,
}

/// The input pairs (j1 < j2) node `i` may read, in a fixed order.
pub fn input_pairs(i: usize) -> Vec<(usize, usize)> {
    let n = 2 + i;
    (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect()
}

fn softmax(row: &[f64]) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

impl Policy {
    /// The uniform policy (all logits zero) over `space`.
    pub fn uniform(space: &SearchSpace) -> Policy {
        let ops: Vec<OpKind> = space.ops.iter().copied().filter(|&o| o != OpKind::None).collect();
        let mut logits = Vec::new();
        for _cell in 0..2 {
            for i in 0..space.nodes {
                logits.push(vec![0.0; input_pairs(i).len()]);
                logits.push(vec![0.0; ops.len()]);
                logits.push(vec![0.0; ops.len()]);
            }
        }
        Policy { logits, ops, nodes: space.nodes }
    }

    /// Draws one choice per decision.
    pub fn sample(&self, rng: &mut impl Rng) -> Vec<usize> {
        self.logits
            .iter()
            .map(|row| {
                let p = softmax(row);
                let u: f64 = rng.random();
                let mut acc = 0.0;
                for (k, pk) in p.iter().enumerate() {
                    acc += pk;
                    if u < acc {
                        return k;
                    }
                }
                p.len() - 1
            })
            .collect()
    }

    /// The genotype of a choice vector.
    pub fn genotype(&self, choice: &[usize]) -> Genotype {
        let concat: Vec<usize> = (2..2 + self.nodes).collect();
        let cell = |c: usize| -> Vec<(OpKind, usize)> {
            (0..self.nodes)
                .flat_map(|i| {
                    let base = 3 * (c * self.nodes + i);
                    let (j1, j2) = input_pairs(i)[choice[base]];
                    [(self.ops[choice[base + 1]], j1), (self.ops[choice[base + 2]], j2)]
                })
                .collect()
        };
        Genotype { normal: cell(0), normal_concat: concat.clone(), reduce: cell(1), reduce_concat: concat }
    }

    /// log p(choice).
    pub fn log_prob(&self, choice: &[usize]) -> f64 {
        self.logits.iter().zip(choice).map(|(row, &k)| softmax(row)[k].ln()).sum()
    }

    /// The policy's entropy (sum over decisions).
    pub fn entropy(&self) -> f64 {
        self.logits.iter().map(|row| -softmax(row).iter().map(|p| p * p.ln()).sum::<f64>()).sum()
    }

    /// Gradient of `advantage * log p(choice) + entropy_weight * entropy` with respect to the logits: per
    /// decision `advantage * (onehot - p) - entropy_weight * p * (log p + H_row)`.
    pub fn objective_gradient(&self, choice: &[usize], advantage: f64, entropy_weight: f64) -> Vec<Vec<f64>> {
        self.logits
            .iter()
            .zip(choice)
            .map(|(row, &k)| {
                let p = softmax(row);
                let h: f64 = -p.iter().map(|q| q * q.ln()).sum::<f64>();
                p.iter()
                    .enumerate()
                    .map(|(j, &pj)| {
                        let onehot = if j == k { 1.0 } else { 0.0 };
                        advantage * (onehot - pj) - entropy_weight * pj * (pj.ln() + h)
                    })
                    .collect()
            })
            .collect()
    }
}

/// Adam ascending the policy objective (PyTorch's update rule, no weight decay), in f64.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyAdam {
    /// Learning rate.
    pub lr: f64,
    /// First moments.
    pub m: Vec<Vec<f64>>,
    /// Second moments.
    pub v: Vec<Vec<f64>>,
    /// Steps taken.
    pub t: u64,
}

impl PolicyAdam {
    /// Fresh state for `policy`.
    pub fn new(policy: &Policy, lr: f64) -> PolicyAdam {
        let zeros: Vec<Vec<f64>> = policy.logits.iter().map(|r| vec![0.0; r.len()]).collect();
        PolicyAdam { lr, m: zeros.clone(), v: zeros, t: 0 }
    }

    /// One ascent step along `grad`.
    pub fn step(&mut self, policy: &mut Policy, grad: &[Vec<f64>]) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        self.t += 1;
        let (c1, c2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
        for (r, g_row) in grad.iter().enumerate() {
            for (j, &g) in g_row.iter().enumerate() {
                self.m[r][j] = b1 * self.m[r][j] + (1.0 - b1) * g;
                self.v[r][j] = b2 * self.v[r][j] + (1.0 - b2) * g * g;
                policy.logits[r][j] += self.lr * (self.m[r][j] / c1) / ((self.v[r][j] / c2).sqrt() + eps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn sampled_genotypes_are_valid_and_cover_the_space() {
        let space = SearchSpace::default();
        let policy = Policy::uniform(&space);
        assert_eq!(policy.logits.len(), 2 * 3 * space.nodes);
        assert!(!policy.ops.contains(&OpKind::None));
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut seen_inputs = std::collections::HashSet::new();
        let mut seen_ops = std::collections::HashSet::new();
        for _ in 0..400 {
            let c = policy.sample(&mut rng);
            let g = policy.genotype(&c);
            g.validate().unwrap();
            for k in (0..g.normal.len()).step_by(2) {
                assert!(g.normal[k].1 < g.normal[k + 1].1, "two distinct inputs per node");
            }
            seen_inputs.extend(g.normal.iter().map(|&(_, j)| j));
            seen_ops.extend(g.reduce.iter().map(|&(o, _)| o));
        }
        assert_eq!(seen_inputs.len(), 2 + space.nodes - 1, "every state but the last node feeds some node");
        assert_eq!(seen_ops.len(), 7, "every real op is drawn");
        // The uniform policy's log-probability: a sum of -ln(choices) over decisions.
        let c = policy.sample(&mut rng);
        let want: f64 =
            (0..space.nodes).map(|i| -(input_pairs(i).len() as f64).ln() - 2.0 * (7f64).ln()).sum::<f64>() * 2.0;
        assert!((policy.log_prob(&c) - want).abs() < 1e-9);
        assert!((policy.entropy() + want).abs() < 1e-9, "uniform: entropy = -log p of any choice");
    }

    #[test]
    fn the_policy_gradient_matches_finite_differences() {
        let space = SearchSpace { nodes: 2, ..Default::default() };
        let mut policy = Policy::uniform(&space);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for row in policy.logits.iter_mut() {
            for x in row.iter_mut() {
                *x = rng.random_range(-1.0..1.0);
            }
        }
        let choice = policy.sample(&mut rng);
        let (adv, ew) = (0.7, 0.05);
        let objective = |p: &Policy| adv * p.log_prob(&choice) + ew * p.entropy();
        let grad = policy.objective_gradient(&choice, adv, ew);
        let h = 1e-6;
        for (r, g_row) in grad.iter().enumerate() {
            for (j, &g) in g_row.iter().enumerate() {
                let mut plus = policy.clone();
                plus.logits[r][j] += h;
                let mut minus = policy.clone();
                minus.logits[r][j] -= h;
                let fd = (objective(&plus) - objective(&minus)) / (2.0 * h);
                assert!((fd - g).abs() < 1e-6, "decision {r} choice {j}: {fd} vs {g}");
            }
        }
    }

    #[test]
    fn reinforce_learns_a_rewarded_architecture() {
        // Reward: the fraction of normal-cell ops that are sep_conv_3x3. REINFORCE with a moving-average baseline
        // must drive the policy there; random sampling stays at 1/7.
        let space = SearchSpace { nodes: 2, ..Default::default() };
        let mut policy = Policy::uniform(&space);
        let mut adam = PolicyAdam::new(&policy, 0.1);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let reward = |g: &Genotype| {
            g.normal.iter().filter(|(o, _)| *o == OpKind::SepConv3x3).count() as f64 / g.normal.len() as f64
        };
        let mut baseline: Option<f64> = None;
        for _ in 0..2000 {
            let c = policy.sample(&mut rng);
            let r = reward(&policy.genotype(&c));
            let b = baseline.unwrap_or(r);
            let g = policy.objective_gradient(&c, r - b, 0.0);
            adam.step(&mut policy, &g);
            baseline = Some(0.9 * b + 0.1 * r);
        }
        let mean: f64 = (0..200).map(|_| reward(&policy.genotype(&policy.sample(&mut rng)))).sum::<f64>() / 200.0;
        assert!(mean > 0.9, "after training the policy picks sep_conv_3x3 {mean:.2} of the time");
    }
}

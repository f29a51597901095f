//! Choosing entity keys: uniform or zipfian over `entities` ids.

use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// How keys are drawn.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum KeyDistribution {
    /// Every entity equally likely.
    Uniform,
    /// A few hot entities (exponent `--zipf-exponent`).
    Zipf,
}

/// Draws entity ids in `0..entities`.
#[derive(Debug, Clone)]
pub enum KeyChooser {
    /// Uniform.
    Uniform(u64),
    /// Zipfian; rank 1 is entity 0.
    Zipf(Zipf<f64>),
}

impl KeyChooser {
    /// A chooser over `entities` ids.
    pub fn new(
        distribution: KeyDistribution,
        entities: u64,
        exponent: f64,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(entities > 0, "need at least one entity");
        Ok(match distribution {
            KeyDistribution::Uniform => KeyChooser::Uniform(entities),
            KeyDistribution::Zipf => KeyChooser::Zipf(
                Zipf::new(entities as f64, exponent)
                    .map_err(|e| anyhow::anyhow!("zipf parameters: {e}"))?,
            ),
        })
    }

    /// One id.
    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.random_range(0..*n),
            // Zipf samples ranks 1..=n as floats.
            KeyChooser::Zipf(zipf) => (zipf.sample(rng) as u64).saturating_sub(1),
        }
    }

    /// `count` distinct-or-not ids for one batch.
    pub fn batch(&self, rng: &mut impl Rng, count: usize) -> Vec<u64> {
        (0..count).map(|_| self.next(rng)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ids_stay_in_range_and_zipf_is_skewed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let zipf = KeyChooser::new(KeyDistribution::Zipf, 1000, 0.99).unwrap();
        let uniform = KeyChooser::new(KeyDistribution::Uniform, 1000, 0.99).unwrap();
        let draws: Vec<u64> = (0..10_000).map(|_| zipf.next(&mut rng)).collect();
        assert!(draws.iter().all(|&id| id < 1000));
        let hot = draws.iter().filter(|&&id| id < 10).count();
        assert!(
            hot > 2_000,
            "the 1% hottest keys take a large share under zipf: {hot}"
        );
        assert!((0..10_000).all(|_| uniform.next(&mut rng) < 1000));
    }
}

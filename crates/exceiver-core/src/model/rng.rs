//! A small deterministic random number generator (SplitMix64) for weight
//! initialisation, masking and tests: reproducible from a seed, no dependency.

/// SplitMix64 (Steele, Lea & Flood 2014): 64-bit state, passes BigCrush, and every
/// seed gives an independent-looking stream.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    spare_normal: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed ^ 0x5851_F42D_4C95_7F2D,
            spare_normal: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    pub fn uniform_range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n) (n > 0), without modulo bias worth mentioning (n << 2^64).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Binomial(n, p): the number of n reads kept at rate p (exact for n ≤ 64 by n
    /// Bernoulli draws; past that the normal approximation, rounded and clamped to
    /// [0, n], whose error is below a read's worth for what thinning needs).
    pub fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if p <= 0.0 || n == 0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        if n <= 64 {
            return (0..n).filter(|_| self.uniform() < p).count() as u64;
        }
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        (mean + sd * self.normal()).round().clamp(0.0, n as f64) as u64
    }

    /// Standard normal (Box–Muller, polar form).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * s.ln() / s).sqrt();
                self.spare_normal = Some(v * f);
                return u * f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments() {
        let mut r = Rng::new(7);
        let n = 100_000;
        let (mut s, mut s2, mut u) = (0.0, 0.0, 0.0);
        for _ in 0..n {
            let z = r.normal();
            s += z;
            s2 += z * z;
            u += r.uniform();
        }
        assert!((s / n as f64).abs() < 0.02);
        assert!((s2 / n as f64 - 1.0).abs() < 0.02);
        assert!((u / n as f64 - 0.5).abs() < 0.01);
        assert!((0..1000).all(|_| r.below(7) < 7));
    }

    #[test]
    fn binomial_has_the_right_mean_and_bounds() {
        let mut r = Rng::new(7);
        for &(n, p) in &[(10u64, 0.3), (1000, 0.5), (5, 0.0), (5, 1.0)] {
            let draws: Vec<u64> = (0..4000).map(|_| r.binomial(n, p)).collect();
            assert!(draws.iter().all(|&k| k <= n));
            let mean = draws.iter().sum::<u64>() as f64 / draws.len() as f64;
            let sd = (n as f64 * p * (1.0 - p) / draws.len() as f64).sqrt();
            assert!(
                (mean - n as f64 * p).abs() <= 5.0 * sd + 1e-9,
                "n {n} p {p}: mean {mean}"
            );
        }
    }
}

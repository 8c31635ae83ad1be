//! Small deterministic generators: the benchmark must be reproducible from its seed, and its
//! verification must recompute the data without touching the region.

/// SplitMix64's finaliser: a good 64-bit mixing function.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64* generator.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(mix(seed) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our n).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf-distributed ranks over `0..n` (Gray et al.'s generator, as YCSB uses), scattered over
/// the range by a bijection so that hot pages are not neighbours.
#[derive(Debug)]
pub(crate) struct Zipf {
    n: u64,
    theta: f64,
    zeta_n: f64,
    alpha: f64,
    eta: f64,
    scatter: u64,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Zipf {
    pub(crate) fn new(n: u64, theta: f64) -> Self {
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zeta_n = zeta(n);
        let zeta_2 = zeta(2.min(n));
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        let mut scatter = 0x9E37_79B9_7F4A_7C15 % n.max(1);
        while n > 1 && gcd(scatter, n) != 1 {
            scatter += 1;
        }
        Self { n, theta, zeta_n, alpha: 1.0 / (1.0 - theta), eta, scatter: scatter.max(1) }
    }

    /// A rank: 0 is the most popular.
    pub(crate) fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }

    /// A sample mapped through `rank * scatter mod n`, a bijection since they are coprime.
    pub(crate) fn sample_scattered(&self, rng: &mut Rng) -> u64 {
        ((u128::from(self.sample(rng)) * u128::from(self.scatter)) % u128::from(self.n)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(10_000, 0.99);
        let mut rng = Rng::new(1);
        let mut counts = vec![0u32; 10_000];
        for _ in 0..200_000 {
            counts[z.sample(&mut rng) as usize] += 1;
        }
        // Rank 0 is drawn far more often than a typical rank, and the top 1% of ranks get a
        // large share.
        assert!(counts[0] > 100 * counts[5000].max(1), "{} vs {}", counts[0], counts[5000]);
        let top: u32 = counts[..100].iter().sum();
        assert!(top > 200_000 / 3, "top 1% drew {top}");
    }

    #[test]
    fn scatter_is_a_bijection() {
        for n in [1u64, 2, 7, 64, 1000, 4096] {
            let z = Zipf::new(n, 0.99);
            let mut seen: Vec<u64> = (0..n).map(|r| (r * z.scatter) % n).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n}");
        }
    }
}

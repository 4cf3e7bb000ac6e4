//! Vector math, hashing and the clock: the leaf every other module of the domain (and the
//! stores and embedders around it) uses, so there is one copy of each.

use sha2::{Digest, Sha256};

/// Cosine similarity. Vectors are stored L2-normalised when the embedder normalises, but
/// client-supplied vectors may not be, so divide by the norms.
// Indexing by lane keeps the six streams visibly in step; it compiles to vector code.
#[allow(clippy::needless_range_loop)]
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> f32 {
    // Sixteen independent partial sums per total, so the compiler can vectorise: one chained
    // sum must be added in order, one element at a time.
    const LANES: usize = 16;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let (mut dot, mut na, mut nb) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for i in 0..LANES {
            dot[i] += x[i] * y[i];
            na[i] += x[i] * x[i];
            nb[i] += y[i] * y[i];
        }
    }
    let (mut dot, mut na, mut nb): (f32, f32, f32) =
        (dot.iter().sum(), na.iter().sum(), nb.iter().sum());
    let tail = len - len % LANES;
    for (x, y) in a[tail..].iter().zip(&b[tail..]) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// `v` scaled to unit length (a zero vector stays zero).
pub fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// UTC day `YYYY-MM-DD` of a millisecond timestamp (civil-from-days, Howard Hinnant).
pub fn day_of(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// First 128 bits of SHA-256, hex encoded.
pub fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_similarity_ignores_length() {
        assert!((cosine_similarity(&[1.0, 0.0], &[3.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine_similarity(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-6);
        assert!((cosine_similarity(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn cosine_similarity_matches_the_textbook_sum_at_every_length() {
        for len in [1usize, 5, 16, 17, 384, 385] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 2.0)
                .collect();
            let dot: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
            let nb: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
            let expected = dot / (na.sqrt() * nb.sqrt());
            let got = f64::from(cosine_similarity(&a, &b));
            assert!(
                (got - expected).abs() < 1e-5,
                "length {len}: {got} vs {expected}"
            );
        }
    }
}

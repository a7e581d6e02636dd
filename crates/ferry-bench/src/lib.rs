//! Shared pieces of ferry's benchmarks: medians and the report format. The benchmarks
//! themselves are binaries in `src/bin/`, run by the scripts in `bench/`.

/// Median of a non-empty sample (the machine is noisy: report medians, not means).
pub fn median(v: &[f64]) -> f64 {
    assert!(!v.is_empty(), "median of nothing");
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Prints one comparison line: ferry's median, the baseline's, their ratio.
pub fn report(what: &str, unit: &str, ferry: &[f64], baseline: &[f64]) -> f64 {
    let (f, b) = (median(ferry), median(baseline));
    let ratio = f / b;
    println!("{what:<34} ferry {f:>12.1} {unit:<8} baseline {b:>12.1} {unit:<8} ratio {ratio:.3}");
    ratio
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(super::median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}

//! Elementwise CPU operations of the decode step that candle ran through libm one value
//! at a time, with an allocation per operation: e^x and SiLU(gate)·up. With AVX-512 16
//! values go at once, with AVX2 8 (e^x by range reduction to [-ln 2/2, ln 2/2] and a
//! polynomial, as Cephes and SLEEF do); elsewhere, plain loops.

/// e^x for each value of `xs`, in place. Relative error below 2e-7 for finite results;
/// -inf gives 0, values above 88.7 +inf, NaN NaN.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512 F.
        unsafe { avx512::exp_in_place(xs) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { avx2::exp_in_place(xs) };
        return;
    }
    for x in xs {
        *x = x.exp();
    }
}

/// `out[i] = gate[i] / (1 + e^-gate[i]) * up[i]`: the MLP's SiLU(gate)·up in one pass.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == up.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512 F; the three slices have the same length.
        unsafe { avx512::silu_mul(gate, up, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the three slices have the same length.
        unsafe { avx2::silu_mul(gate, up, out) };
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    is_x86_feature_detected!("avx512f")
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use core::arch::x86_64::*;

    /// The sums of four registers' 8 lanes, as four lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum4x8(v: [__m256; 4]) -> __m128 {
        let a = _mm256_hadd_ps(v[0], v[1]);
        let b = _mm256_hadd_ps(v[2], v[3]);
        let t = _mm256_hadd_ps(a, b);
        _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
    }

    /// 2^n for integral n in [-126, 127], as f32 bits.
    #[inline(always)]
    unsafe fn pow2(n: __m256i) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            n,
            _mm256_set1_epi32(127),
        )))
    }

    /// e^x of 8 values, as the AVX-512 `exp16`; 2^n is applied in two halves so that
    /// results near f32's ends (n from -150 to 128) stay right.
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        unsafe {
            // NaN, the second operand, stays NaN through both.
            let x = _mm256_min_ps(_mm256_set1_ps(89.0), x);
            let x = _mm256_max_ps(_mm256_set1_ps(-104.0), x);
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let c = |v: f32| _mm256_set1_ps(v);
            let mut p = c(1.0 / 5040.0);
            for k in [720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
                p = _mm256_fmadd_ps(p, r, c(1.0 / k));
            }
            let n = _mm256_cvtps_epi32(n);
            let half = _mm256_srai_epi32::<1>(n);
            let p = _mm256_mul_ps(p, pow2(half));
            _mm256_mul_ps(p, pow2(_mm256_sub_epi32(n, half)))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            unsafe { _mm256_storeu_ps(p, exp8(_mm256_loadu_ps(p))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut v = [0f32; 8];
            v[..rest.len()].copy_from_slice(rest);
            unsafe { _mm256_storeu_ps(v.as_mut_ptr(), exp8(_mm256_loadu_ps(v.as_ptr()))) };
            rest.copy_from_slice(&v[..rest.len()]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let one = _mm256_set1_ps(1.0);
        let silu = |g: __m256, u: __m256| unsafe {
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u)
        };
        let mut i = 0;
        while i + 8 <= n {
            unsafe {
                let g = _mm256_loadu_ps(gate.as_ptr().add(i));
                let u = _mm256_loadu_ps(up.as_ptr().add(i));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), silu(g, u));
            }
            i += 8;
        }
        if i < n {
            let (mut g, mut u, mut o) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            g[..n - i].copy_from_slice(&gate[i..]);
            u[..n - i].copy_from_slice(&up[i..]);
            unsafe {
                let y = silu(_mm256_loadu_ps(g.as_ptr()), _mm256_loadu_ps(u.as_ptr()));
                _mm256_storeu_ps(o.as_mut_ptr(), y);
            }
            out[i..].copy_from_slice(&o[..n - i]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use core::arch::x86_64::*;

    /// The sums of four registers' 16 lanes, as four lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum4x16(v: [__m512; 4]) -> __m128 {
        // Lanes of 128 bits pairwise, then registers pairwise, then within each lane.
        let t01 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(v[0], v[1]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(v[0], v[1]),
        );
        let t23 = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(v[2], v[3]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(v[2], v[3]),
        );
        // Lane i now holds register i's four partial sums (two halves added).
        let u = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(t01, t23),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(t01, t23),
        );
        let lanes = [
            _mm512_extractf32x4_ps::<0>(u),
            _mm512_extractf32x4_ps::<1>(u),
            _mm512_extractf32x4_ps::<2>(u),
            _mm512_extractf32x4_ps::<3>(u),
        ];
        unsafe { hsum4x4(lanes) }
    }

    /// The sums of four registers' 4 lanes, as four lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum4x4(v: [__m128; 4]) -> __m128 {
        let a = _mm_hadd_ps(v[0], v[1]);
        let b = _mm_hadd_ps(v[2], v[3]);
        _mm_hadd_ps(a, b)
    }

    /// e^x of 16 values: x = n·ln 2 + r with n an integer and |r| ≤ ln 2/2 (ln 2 in two
    /// parts, Cody and Waite), e^r by its Taylor polynomial to degree 7 (error below
    /// 1e-8 on that range), times 2^n by `vscalefps`.
    #[inline(always)]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        // Above ln(f32::MAX) the result overflows to inf; below -104 it is 0 anyway.
        // (NaN, the second operand, stays NaN.)
        let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let c = |v: f32| _mm512_set1_ps(v);
        let mut p = c(1.0 / 5040.0);
        for k in [720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, c(1.0 / k));
        }
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(16);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            unsafe { _mm512_storeu_ps(p, exp16(_mm512_loadu_ps(p))) };
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mask = (1u16 << rest.len()) - 1;
            let p = rest.as_mut_ptr();
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, p);
                _mm512_mask_storeu_ps(p, mask, exp16(v));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len();
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            let mask: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                (1u16 << (n - i)) - 1
            };
            unsafe {
                let g = _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(i));
                let u = _mm512_maskz_loadu_ps(mask, up.as_ptr().add(i));
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
                let y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, y);
            }
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_2e_7_of_libm_over_the_softmax_range_and_edges() {
        let mut xs: Vec<f32> = (0..20000).map(|i| -100.0 + i as f32 * 0.00937).collect();
        xs.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            88.0,
            88.7,
            100.0,
            -104.0,
            -200.0,
            f32::NEG_INFINITY,
        ]);
        // A length that is not a multiple of 16 covers the masked tail.
        xs.push(0.5);
        xs.push(f32::NAN);
        let mut got = xs.clone();
        exp_in_place(&mut got);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            if x.is_nan() {
                assert!(y.is_nan());
            } else if want > f32::MAX as f64 {
                assert_eq!(y, f32::INFINITY, "e^{x}");
            } else if want < 1e-37 {
                assert!(y.abs() < 1e-37, "e^{x} = {y}");
            } else {
                let rel = ((y as f64 - want) / want).abs();
                assert!(rel < 2e-7, "e^{x}: {y} vs {want} ({rel:e})");
            }
        }
    }

    #[test]
    fn silu_mul_matches_the_formula() {
        let gate: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let up: Vec<f32> = (0..1003)
            .map(|i| ((i * 37) % 101) as f32 * 0.1 - 5.0)
            .collect();
        let mut out = vec![f32::NAN; gate.len()];
        silu_mul(&gate, &up, &mut out);
        for ((&g, &u), &y) in gate.iter().zip(&up).zip(&out) {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu({g})·{u}: {y} vs {want}"
            );
        }
    }
}

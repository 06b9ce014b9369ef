//! duet's own CPU kernels, chosen at run time from what the CPU has ([`kquants`]: Q4_K /
//! Q6_K from the mapped file; [`matmul`]: Q5_0 / Q8_0 tiles; [`attention`]: decode
//! attention; [`ops`]: elementwise), and which CPU this is, read with CPUID, with the
//! kernels that run on it. Numbers measured on one CPU family say little about another
//! (the K-quant decode of the 1.5B ran at 1.58x llama.cpp on an Intel Xeon and was
//! reported at 0.6x on an AMD EPYC), so `duet bench` and the logs say what they ran on.

pub mod attention;
pub mod bytes;
pub mod kquants;
pub mod matmul;
pub mod ops;

use serde::Serialize;

/// The processor, as CPUID reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CpuId {
    /// "GenuineIntel", "AuthenticAMD", … ("unknown" off x86-64).
    pub vendor: String,
    /// The brand string ("AMD EPYC", "Intel(R) Xeon(R) Processor", …).
    pub name: String,
    /// Display family and model (extended fields folded in, as /proc/cpuinfo shows
    /// them): AMD Zen 4 is family 25, Zen 5 family 26.
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
}

impl CpuId {
    pub fn read() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            // SAFETY: CPUID exists on every x86-64 processor; leaves above the maximum
            // the processor reports are not queried.
            let (vendor, max_ext, sig) = {
                let l0 = __cpuid(0);
                let mut v = Vec::with_capacity(12);
                for r in [l0.ebx, l0.edx, l0.ecx] {
                    v.extend_from_slice(&r.to_le_bytes());
                }
                (
                    String::from_utf8_lossy(&v).into_owned(),
                    __cpuid(0x8000_0000).eax,
                    __cpuid(1).eax,
                )
            };
            let name = if max_ext >= 0x8000_0004 {
                let mut b = Vec::with_capacity(48);
                for leaf in 0x8000_0002..=0x8000_0004u32 {
                    // SAFETY: the leaf is within the reported extended maximum.
                    let r = __cpuid(leaf);
                    for x in [r.eax, r.ebx, r.ecx, r.edx] {
                        b.extend_from_slice(&x.to_le_bytes());
                    }
                }
                String::from_utf8_lossy(&b)
                    .trim_matches(char::from(0))
                    .trim()
                    .to_string()
            } else {
                String::new()
            };
            let base_family = (sig >> 8) & 0xf;
            let family = if base_family == 0xf {
                base_family + ((sig >> 20) & 0xff)
            } else {
                base_family
            };
            let model = if base_family == 0x6 || base_family == 0xf {
                ((sig >> 16) & 0xf) << 4 | ((sig >> 4) & 0xf)
            } else {
                (sig >> 4) & 0xf
            };
            Self {
                vendor,
                name,
                family,
                model,
                stepping: sig & 0xf,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Self {
            vendor: "unknown".into(),
            name: std::env::consts::ARCH.into(),
            family: 0,
            model: 0,
            stepping: 0,
        }
    }

    /// The CPU family in words, where it is one these machines have had.
    pub fn family_name(&self) -> Option<&'static str> {
        match (self.vendor.as_str(), self.family) {
            // Family 19h: Zen 3 (Milan 01h, Vermeer 21h, Cezanne 50h; Zen 3+ 44h) and
            // Zen 4 (Genoa 11h, Raphael 61h, Phoenix 74h/78h, Bergamo A0h).
            ("AuthenticAMD", 0x19) if matches!(self.model, 0x00..=0x0f | 0x20..=0x5f) => {
                Some("AMD Zen 3")
            }
            ("AuthenticAMD", 0x19) => Some("AMD Zen 4"),
            ("AuthenticAMD", 0x1a) => Some("AMD Zen 5"),
            ("GenuineIntel", 6) => Some("Intel Core/Xeon"),
            _ => None,
        }
    }
}

impl std::fmt::Display for CpuId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, family {} model {} stepping {}",
            if self.name.is_empty() {
                "unnamed CPU"
            } else {
                &self.name
            },
            self.vendor,
            self.family,
            self.model,
            self.stepping
        )?;
        if let Some(family) = self.family_name() {
            write!(f, ", {family}")?;
        }
        write!(f, ")")
    }
}

/// Activation rows per work item of a matmul over many rows: as many (a multiple of
/// `multiple`, at least that) as keep one item's quantized activations (`row_bytes`
/// each) within a share of L2 that every CPU here has, so that they are read from L2,
/// not L3, by each group of weight rows that meets them.
pub(crate) fn act_chunk_rows(row_bytes: usize, m: usize, multiple: usize) -> usize {
    const BUDGET: usize = 128 << 10;
    let rows = (BUDGET / row_bytes.max(1)) / multiple * multiple;
    rows.max(multiple).min(m.max(1))
}

/// duet's own CPU kernels that this CPU runs (else candle's run), in words.
pub fn kernels() -> String {
    let mut k = Vec::new();
    match kquants::best() {
        Some(kquants::Kernel::Avx512) => k.push("Q4_K/Q6_K from the mapped file (AVX-512 VNNI)"),
        Some(kquants::Kernel::Avx2) => k.push("Q4_K/Q6_K from the mapped file (AVX2)"),
        _ => {}
    }
    use matmul::{BlockQ5, BlockQ8_0, TileKernel};
    match (
        matmul::tile_kernel::<BlockQ5>(),
        matmul::tile_kernel::<BlockQ8_0>(),
    ) {
        (Some(TileKernel::Avx512), _) => k.push("Q5_0/Q8_0 tiles (AVX-512 VNNI)"),
        (Some(TileKernel::Avx2), None) => k.push("Q5_0 tiles, Q8_0 rows (AVX2)"),
        _ => {}
    }
    if k.is_empty() {
        "candle's".into()
    } else {
        k.join(", ")
    }
}

/// Activation rows for the kernels' batch-invariance tests: random, except row 1 constant
/// (the largest integer sums, past f32's 2^24), row 2 zero and row 3 with an outlier at
/// column `outlier`.
#[cfg(test)]
pub(crate) fn invariance_rows(rows: usize, k: usize, outlier: usize) -> Vec<f32> {
    let mut x: Vec<f32> =
        candle_core::Tensor::randn(0f32, 1f32, rows * k, &candle_core::Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
    x[k..2 * k].fill(1.0);
    x[2 * k..3 * k].fill(0.0);
    x[3 * k + outlier] = 1000.0;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What CPUID says agrees with the kernel's reading of it.
    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn cpuid_agrees_with_proc_cpuinfo() {
        let id = CpuId::read();
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let field = |key: &str| {
            info.lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(key))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
                .unwrap()
        };
        assert_eq!(id.vendor, field("vendor_id"));
        assert_eq!(id.family.to_string(), field("cpu family"));
        assert_eq!(id.model.to_string(), field("model"));
        assert_eq!(id.name, field("model name"));
        assert!(id.to_string().contains(&id.vendor));
    }
}

//! Times the decode GEMV/GEMM kernels on the GPU (scripts/gpu-kernel-bench.sh runs it there):
//! every variant of [`pare_kernels::GemvKernel`] against cuBLAS (candle's matmul) on the
//! Llama-3-8B decode shapes, for 1 to 32 rows, with each output checked against cuBLAS's. Prints
//! one line per (shape, rows) and, last, a table of the per-step totals of the 8B model.
//!
//! Usage: kernel_bench [--reps N] [--csv FILE]. Needs the `cuda` feature and a GPU.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("kernel_bench needs the `cuda` feature (scripts/build-cuda.sh builds it)");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn main() -> candle_core::Result<()> {
    bench::run()
}

#[cfg(feature = "cuda")]
mod bench {
    use std::io::Write;
    use std::time::Instant;

    use candle_core::{DType, Device, Result, Tensor};
    use pare_kernels::{gemv_plan, gemv_with, GemvKernel};

    /// Llama-3-8B's decode products as pare runs them (q·k·v and gate·up stacked at load): name,
    /// N, K, times per step (32 layers; the LM head once).
    const SHAPES: [(&str, usize, usize, usize); 5] = [
        ("qkv", 6144, 4096, 32),
        ("o", 4096, 4096, 32),
        ("gate_up", 28672, 4096, 32),
        ("down", 4096, 14336, 32),
        ("lm_head", 128256, 4096, 1),
    ];
    const ROWS: [usize; 7] = [1, 2, 4, 8, 16, 24, 32];

    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        Ok((num / den.max(1e-30)).sqrt())
    }

    /// Median seconds of `f` over `reps` runs after 3 warm-ups; each run is timed between device
    /// synchronizations, rotating over the weight copies so that L2 does not serve them.
    fn time(dev: &Device, reps: usize, mut f: impl FnMut(usize) -> Result<Tensor>) -> Result<f64> {
        for i in 0..3 {
            f(i)?;
        }
        dev.synchronize()?;
        let mut times = Vec::with_capacity(reps);
        for i in 0..reps {
            let t0 = Instant::now();
            // Ten launches per sample: a lone launch's host overhead would dominate small kernels.
            for j in 0..10 {
                f(i * 10 + j)?;
            }
            dev.synchronize()?;
            times.push(t0.elapsed().as_secs_f64() / 10.0);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[reps / 2])
    }

    fn name(k: &GemvKernel) -> String {
        match k {
            GemvKernel::Warp { loads, warps_per_row } => format!("warp-u{loads}-w{warps_per_row}"),
            GemvKernel::Mma { m_tiles, loads, split } => format!("mma-m{m_tiles}-u{loads}-s{split}"),
        }
    }

    pub fn run() -> Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
        let reps: usize = arg("--reps").map_or(20, |r| r.parse().expect("--reps N"));
        let mut csv = arg("--csv").map(|p| std::fs::File::create(p).expect("--csv FILE"));
        let dev = Device::new_cuda(0)?;
        let sms = 132; // only for the plan's split; the plan reads the real count at run time
        let bw_sheet = pare_kernels::memory_bandwidth(&dev).unwrap_or(0.0);

        // Copy bandwidth (bytes read + written), the ceiling a weight stream is measured against.
        let big = Tensor::ones(1 << 30, DType::BF16, &dev)?;
        let copy_s = time(&dev, 5, |_| big.copy())?;
        let copy_bw = 2.0 * 2.0 * (1u64 << 30) as f64 / copy_s;
        drop(big);
        println!("copy bandwidth {:.2} TB/s; datasheet {:.2} TB/s", copy_bw / 1e12, bw_sheet / 1e12);
        if let Some(f) = csv.as_mut() {
            writeln!(f, "shape,rows,kernel,us,gbps,pct_copy,rel_err").unwrap();
        }

        // Per-step totals over the 8B model: rows → (cuBLAS, legacy, plan, best) seconds.
        let mut totals: Vec<(usize, [f64; 4])> = ROWS.iter().map(|&r| (r, [0.0; 4])).collect();
        println!(
            "{:<8}{:>5}{:>10}{:>10}{:>10}{:>10}  {:<18}{:>7}{:>9}",
            "shape", "rows", "cublas", "legacy", "plan", "best", "best kernel", "%copy", "max err"
        );
        for (shape, n, k, per_step) in SHAPES {
            let bytes = (n * k * 2) as f64;
            let copies = (256e6 / bytes).ceil().max(1.0) as usize;
            let ws: Vec<Tensor> = (0..copies)
                .map(|_| Tensor::randn(0f32, 0.02, (n, k), &dev)?.to_dtype(DType::BF16))
                .collect::<Result<_>>()?;
            for (ri, &rows) in ROWS.iter().enumerate() {
                let x = Tensor::randn(0f32, 1.0, (rows, k), &dev)?.to_dtype(DType::BF16)?;
                let reference = x.matmul(&ws[0].t()?)?;
                let cublas = time(&dev, reps, |i| x.matmul(&ws[i % copies].t()?))?;
                let plan = gemv_plan(rows, n, k, sms, bw_sheet);
                let mut variants = vec![plan];
                if rows <= 8 {
                    let wpr = match plan {
                        GemvKernel::Warp { warps_per_row, .. } => warps_per_row,
                        _ => gemv_plan(1, n, k, sms, 0.0).warps_per_row(),
                    };
                    for loads in [4, 8] {
                        variants.push(GemvKernel::Warp { loads, warps_per_row: wpr });
                    }
                }
                let split0 = match gemv_plan(rows.max(2), n, k, sms, bw_sheet) {
                    GemvKernel::Mma { split, .. } => split,
                    _ => 4,
                };
                for m_tiles in [1, 2] {
                    for loads in [2, 4, 8] {
                        for split in [split0, (split0 / 2).max(1), (split0 * 2).min(8)] {
                            let v = GemvKernel::Mma { m_tiles, loads, split };
                            if !variants.contains(&v) {
                                variants.push(v);
                            }
                        }
                    }
                }
                let legacy = (rows <= 8).then(|| GemvKernel::Warp {
                    loads: 4,
                    warps_per_row: gemv_plan(1, n, k, sms, 0.0).warps_per_row(),
                });
                let mut results = Vec::new();
                let mut worst = 0f64;
                for v in &variants {
                    let e = rel_err(&gemv_with(&x, &ws[0], *v)?, &reference)?;
                    worst = worst.max(e);
                    let s = time(&dev, reps, |i| gemv_with(&x, &ws[i % copies], *v))?;
                    if let Some(f) = csv.as_mut() {
                        writeln!(
                            f,
                            "{shape},{rows},{},{:.2},{:.1},{:.1},{e:.2e}",
                            name(v),
                            s * 1e6,
                            bytes / s / 1e9,
                            bytes / s / copy_bw * 100.0
                        )
                        .unwrap();
                    }
                    results.push((*v, s));
                }
                if let Some(f) = csv.as_mut() {
                    writeln!(
                        f,
                        "{shape},{rows},cublas,{:.2},{:.1},{:.1},0",
                        cublas * 1e6,
                        bytes / cublas / 1e9,
                        bytes / cublas / copy_bw * 100.0
                    )
                    .unwrap();
                }
                let plan_s = results[0].1;
                let legacy_s = legacy.map_or(cublas, |l| results.iter().find(|r| r.0 == l).map_or(cublas, |r| r.1));
                let (best, best_s) = results.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1)).expect("variants");
                println!(
                    "{shape:<8}{rows:>5}{:>10.1}{:>10.1}{:>10.1}{:>10.1}  {:<18}{:>7.1}{:>9.1e}",
                    cublas * 1e6,
                    legacy_s * 1e6,
                    plan_s * 1e6,
                    best_s * 1e6,
                    name(&best),
                    bytes / best_s / copy_bw * 100.0,
                    worst
                );
                let t = &mut totals[ri].1;
                for (slot, s) in [cublas, legacy_s, plan_s, best_s].into_iter().enumerate() {
                    t[slot] += s * per_step as f64;
                }
            }
        }
        let weights: f64 = SHAPES.iter().map(|(_, n, k, c)| (n * k * 2 * c) as f64).sum();
        println!("8B decode step, matrix products only ({:.2} GB of weights), ms:", weights / 1e9);
        println!(
            "{:>5}{:>9}{:>9}{:>9}{:>9}{:>11}{:>12}",
            "rows", "cublas", "legacy", "plan", "best", "plan %copy", "plan ×rows1"
        );
        let one = totals[0].1[2];
        for (rows, t) in &totals {
            println!(
                "{rows:>5}{:>9.3}{:>9.3}{:>9.3}{:>9.3}{:>11.1}{:>12.2}",
                t[0] * 1e3,
                t[1] * 1e3,
                t[2] * 1e3,
                t[3] * 1e3,
                weights / t[2] / copy_bw * 100.0,
                t[2] / one
            );
        }
        Ok(())
    }

    trait WarpsPerRow {
        fn warps_per_row(&self) -> usize;
    }
    impl WarpsPerRow for GemvKernel {
        fn warps_per_row(&self) -> usize {
            match self {
                GemvKernel::Warp { warps_per_row, .. } => *warps_per_row,
                GemvKernel::Mma { .. } => 1,
            }
        }
    }
}

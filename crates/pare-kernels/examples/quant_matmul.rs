//! Throughput of the quantized matmul against candle's f32 matmul on the same (dequantized)
//! weights: `cargo run --release -p pare-kernels --example quant_matmul -- [TYPE] [N] [K] [M...]`.
//! Random blocks; a timing tool for bench scripts, not a test.

use candle_core::{Device, Tensor};
use pare_kernels::quant::{QuantMatrix, QuantType};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ty = args.first().map_or("Q4_1", String::as_str);
    let ty = QuantType::ALL.into_iter().find(|t| t.name() == ty).expect("a type such as Q4_1 or Q4_K");
    let n: usize = args.get(1).map_or(1536, |s| s.parse().unwrap());
    let k: usize = args.get(2).map_or(576, |s| s.parse().unwrap());
    let ms: Vec<usize> =
        if args.len() > 3 { args[3..].iter().map(|s| s.parse().unwrap()).collect() } else { vec![1, 512] };
    pare_kernels::threads::init(None).unwrap();
    let bytes = n * k / ty.block_elems() * ty.block_bytes();
    // Random codes with small positive f16 scales at every 2-byte position that holds one is not
    // needed for timing: the work does not depend on the values, only NaNs could slow floats.
    let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 & 0x3B).collect();
    let w = QuantMatrix::new(ty, n, k, data).unwrap();
    let dense = Tensor::from_vec(w.dequantize(), (n, k), &Device::Cpu).unwrap();
    for m in ms {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let reps = (200_000_000 / (m * n * k / 100)).clamp(3, 20000);
        // CPU seconds over all threads, per call: on a machine shared with other jobs, wall time
        // measures the neighbours; CPU time measures the work.
        let time = |f: &dyn Fn()| {
            f();
            let t = cpu_seconds();
            for _ in 0..reps {
                f();
            }
            (cpu_seconds() - t) / reps as f64
        };
        let tq = time(&|| {
            std::hint::black_box(w.matmul(&x).unwrap());
        });
        let tf = time(&|| {
            std::hint::black_box(xt.matmul(&dense.t().unwrap()).unwrap());
        });
        let tg = time(&|| {
            std::hint::black_box(w.gemm(&x).unwrap());
        });
        let td = time(&|| {
            std::hint::black_box(w.dequantize());
        });
        println!("{} {n}x{k}: dequantize {:.1} cpu-us", ty.name(), td * 1e6);
        println!(
            "{} {n}x{k} m={m}: gemm {:.1} cpu-us ({:.1} GMAC per cpu-s)",
            ty.name(),
            tg * 1e6,
            (m * n * k) as f64 / 1e9 / tg
        );
        let gmac = (m * n * k) as f64 / 1e9;
        println!(
            "{} {n}x{k} m={m}: quant {:.1} cpu-us ({:.1} GMAC per cpu-s, {:.2} GB/s of blocks), f32 {:.1} cpu-us ({:.1} GMAC per cpu-s)",
            ty.name(),
            tq * 1e6,
            gmac / tq,
            w.data().len() as f64 / tq / 1e9,
            tf * 1e6,
            gmac / tf
        );
    }
}

/// utime + stime of this process from /proc/self/stat (Linux), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

//! A FLOPs and memory report: the run counted, its unpruned baseline, the reductions, an
//! optional closed-form estimate and optional measurements, as JSON or as a table for people.

use std::fmt::Write;

use serde::Serialize;

use crate::error::Result;
use crate::flops::{analyze, Analysis, Components, KvPolicy, Scenario, SpanKind, TextShapes};
use crate::formulas::Formula;

#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub arch: String,
    pub layers: usize,
    pub hidden: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// The first layer's head counts and MLP width (others may differ: `uniform`).
    pub heads: usize,
    pub kv_heads: usize,
    pub mlp_width: usize,
    pub mlp: &'static str,
    pub uniform: bool,
    /// Parameters of the decoder's matrices, LM head included, embeddings excluded.
    pub matrix_params: u64,
}

impl ModelSummary {
    pub fn new(name: &str, arch: &str, shapes: &TextShapes) -> Self {
        let first =
            shapes.layers.first().copied().unwrap_or(crate::flops::LayerShape { heads: 0, kv_heads: 0, mlp_width: 0 });
        ModelSummary {
            name: name.to_string(),
            arch: arch.to_string(),
            layers: shapes.layers.len(),
            hidden: shapes.hidden,
            head_dim: shapes.head_dim,
            vocab: shapes.vocab,
            heads: first.heads,
            kv_heads: first.kv_heads,
            mlp_width: first.mlp_width,
            mlp: if shapes.gated_mlp { "swiglu" } else { "two-matrix" },
            uniform: shapes.layers.iter().all(|l| *l == first),
            matrix_params: shapes.matrix_params(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    #[serde(flatten)]
    pub components: Components,
    pub total: u64,
}

impl From<Components> for Phase {
    fn from(components: Components) -> Self {
        Phase { total: components.total(), components }
    }
}

/// Consecutive layers that run on the same number of tokens.
#[derive(Debug, Clone, Serialize)]
pub struct LayerRun {
    pub first_layer: usize,
    pub last_layer: usize,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunCounts {
    pub prefill: Phase,
    pub decode: Phase,
    pub decode_steps: usize,
    pub total: u64,
    pub kv_bytes_after_prefill: u64,
    pub kv_bytes_final: u64,
}

impl From<&Analysis> for RunCounts {
    fn from(a: &Analysis) -> Self {
        RunCounts {
            prefill: a.prefill.into(),
            decode: a.decode.into(),
            decode_steps: a.decode_steps,
            total: a.total(),
            kv_bytes_after_prefill: a.kv_bytes_after_prefill,
            kv_bytes_final: a.kv_bytes_final,
        }
    }
}

/// Fractions saved against the unpruned run (0.38 = 38 % fewer).
#[derive(Debug, Clone, Serialize)]
pub struct Reduction {
    pub prefill: f64,
    pub prefill_attention: f64,
    pub decode: f64,
    pub total: f64,
    pub kv_after_prefill: f64,
    pub kv_final: f64,
}

fn saved(base: u64, now: u64) -> f64 {
    if base == 0 {
        0.0
    } else {
        1.0 - now as f64 / base as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FormulaReport {
    pub formula: Formula,
    pub expression: &'static str,
    pub baseline: u64,
    pub pruned: u64,
    pub reduction: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioSummary {
    pub prompt_len: usize,
    pub image_tokens: usize,
    pub gen_len: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prune_tokens: Option<String>,
    pub span: SpanKind,
    pub kv: KvPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub press: Option<String>,
    pub kv_bytes_per_value: usize,
}

/// Wall-clock numbers of one real run (`pare flops --measure`).
#[derive(Debug, Clone, Serialize)]
pub struct MeasuredRun {
    pub prefill_s: f64,
    /// Prefill plus choosing the first token.
    pub ttft_s: f64,
    pub decode_s: f64,
    pub decode_tok_s: f64,
    /// Peak resident memory of the process during the run (CPU; None where unknown).
    pub peak_memory_bytes: Option<u64>,
    /// The cache as pare holds it: measured, to set beside the theory.
    pub kv_bytes_after_prefill: u64,
    pub kv_bytes_final: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub device: String,
    pub dtype: String,
    pub repeats: usize,
    pub baseline: MeasuredRun,
    pub pruned: MeasuredRun,
    pub prefill_speedup: f64,
    pub ttft_speedup: f64,
}

impl Measured {
    pub fn new(device: &str, dtype: &str, repeats: usize, baseline: MeasuredRun, pruned: MeasuredRun) -> Self {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        Measured {
            device: device.into(),
            dtype: dtype.into(),
            repeats,
            prefill_speedup: ratio(baseline.prefill_s, pruned.prefill_s),
            ttft_speedup: ratio(baseline.ttft_s, pruned.ttft_s),
            baseline,
            pruned,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FlopsReport {
    pub model: ModelSummary,
    pub scenario: ScenarioSummary,
    pub tokens_per_layer: Vec<LayerRun>,
    pub kv_entries_after_prefill: Vec<LayerRun>,
    pub run: RunCounts,
    pub baseline: RunCounts,
    pub reduction: Reduction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub formula: Option<FormulaReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

fn runs(per_layer: &[usize]) -> Vec<LayerRun> {
    let mut out: Vec<LayerRun> = Vec::new();
    for (i, &t) in per_layer.iter().enumerate() {
        match out.last_mut() {
            Some(r) if r.tokens == t => r.last_layer = i,
            _ => out.push(LayerRun { first_layer: i, last_layer: i, tokens: t }),
        }
    }
    out
}

impl FlopsReport {
    /// Count `sc` and its unpruned baseline on `shapes`, with `formula`'s estimate beside them.
    pub fn build(
        model: ModelSummary,
        shapes: &TextShapes,
        sc: &Scenario,
        summary: ScenarioSummary,
        formula: Formula,
    ) -> Result<Self> {
        let run = analyze(shapes, sc)?;
        let base = analyze(shapes, &sc.unpruned())?;
        let formula = formula.prefill(shapes, &base.seq_per_layer).map(|baseline| {
            let pruned = formula.prefill(shapes, &run.seq_per_layer).unwrap_or(0);
            FormulaReport {
                formula,
                expression: formula.expression(),
                baseline,
                pruned,
                reduction: saved(baseline, pruned),
            }
        });
        Ok(FlopsReport {
            model,
            scenario: summary,
            tokens_per_layer: runs(&run.seq_per_layer),
            kv_entries_after_prefill: runs(&run.kv_entries_after_prefill),
            reduction: Reduction {
                prefill: saved(base.prefill.total(), run.prefill.total()),
                prefill_attention: saved(base.prefill.attention, run.prefill.attention),
                decode: saved(base.decode.total(), run.decode.total()),
                total: saved(base.total(), run.total()),
                kv_after_prefill: saved(base.kv_bytes_after_prefill, run.kv_bytes_after_prefill),
                kv_final: saved(base.kv_bytes_final, run.kv_bytes_final),
            },
            run: (&run).into(),
            baseline: (&base).into(),
            formula,
            measured: None,
        })
    }

    /// The report as a table for a terminal.
    pub fn render(&self) -> String {
        let m = &self.model;
        let s = &self.scenario;
        let mut out = String::new();
        let gqa =
            if m.kv_heads != m.heads { format!("GQA {}/{}", m.heads, m.kv_heads) } else { format!("{}", m.heads) };
        let _ = writeln!(
            out,
            "model   {} ({}, {} layers, hidden {}, {gqa} heads × {}, {} MLP {}{}, vocab {}, {} matrix params)",
            m.name,
            m.arch,
            m.layers,
            m.hidden,
            m.head_dim,
            m.mlp,
            m.mlp_width,
            if m.uniform { "" } else { ", per-layer widths differ" },
            m.vocab,
            human(m.matrix_params as f64)
        );
        let image = if s.image_tokens > 0 { format!(" + {} image tokens", s.image_tokens) } else { String::new() };
        let prune =
            s.prune_tokens.as_ref().map(|p| format!("; prune {p} ({})", span_name(&s.span))).unwrap_or_default();
        let press = s.press.as_ref().map(|p| format!("; press {p}")).unwrap_or_default();
        let _ = writeln!(out, "run     prompt {}{image}, {} generated{prune}{press}", s.prompt_len, s.gen_len);
        let layers: Vec<String> = self
            .tokens_per_layer
            .iter()
            .map(|r| {
                if r.first_layer == r.last_layer {
                    format!("layer {}: {}", r.first_layer, r.tokens)
                } else {
                    format!("layers {}-{}: {}", r.first_layer, r.last_layer, r.tokens)
                }
            })
            .collect();
        let _ = writeln!(out, "tokens  {}", layers.join(", "));
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "FLOPs            {:>12} {:>12} {:>12} {:>12}",
            "prefill", "decode", "unpruned pf", "unpruned dec"
        );
        let (r, b) = (&self.run, &self.baseline);
        type Row = (&'static str, fn(&Components) -> u64);
        let rows: [Row; 5] = [
            ("projections", |c| c.projections),
            ("attention", |c| c.attention),
            ("mlp", |c| c.mlp),
            ("lm_head", |c| c.lm_head),
            ("vision", |c| c.vision),
        ];
        for (name, get) in rows {
            if name == "vision" && get(&b.prefill.components) == 0 {
                continue;
            }
            let cells = [
                get(&r.prefill.components),
                get(&r.decode.components),
                get(&b.prefill.components),
                get(&b.decode.components),
            ];
            let _ = writeln!(
                out,
                "  {name:<14} {:>12} {:>12} {:>12} {:>12}",
                flops(cells[0]),
                flops(cells[1]),
                flops(cells[2]),
                flops(cells[3])
            );
        }
        let _ = writeln!(
            out,
            "  {:<14} {:>12} {:>12} {:>12} {:>12}",
            "total",
            flops(r.prefill.total),
            flops(r.decode.total),
            flops(b.prefill.total),
            flops(b.decode.total)
        );
        let red = &self.reduction;
        let _ = writeln!(
            out,
            "saved   prefill {} (attention {}), decode {} ({} steps), whole run {}",
            pct(red.prefill),
            pct(red.prefill_attention),
            pct(red.decode),
            r.decode_steps,
            pct(red.total)
        );
        let _ = writeln!(
            out,
            "KV      after prefill {} (unpruned {}), at the end {} (unpruned {}), {} B per value",
            bytes(r.kv_bytes_after_prefill),
            bytes(b.kv_bytes_after_prefill),
            bytes(r.kv_bytes_final),
            bytes(b.kv_bytes_final),
            s.kv_bytes_per_value
        );
        if let Some(f) = &self.formula {
            let _ = writeln!(
                out,
                "formula {} {}: prefill {} → {} ({} saved; exact: {})",
                f.formula.name(),
                f.expression,
                flops(f.baseline),
                flops(f.pruned),
                pct(f.reduction),
                pct(red.prefill)
            );
        }
        if let Some(ms) = &self.measured {
            let _ = writeln!(out);
            let _ = writeln!(out, "measured on {} ({}), best of {}:", ms.device, ms.dtype, ms.repeats);
            for (name, run) in [("unpruned", &ms.baseline), ("this run", &ms.pruned)] {
                let mem = run.peak_memory_bytes.map(bytes).unwrap_or_else(|| "n/a".into());
                let _ = writeln!(
                    out,
                    "  {name:<9} prefill {:.3} s, first token {:.3} s, decode {:.1} tok/s, peak memory {mem}, KV {} → {}",
                    run.prefill_s,
                    run.ttft_s,
                    run.decode_tok_s,
                    bytes(run.kv_bytes_after_prefill),
                    bytes(run.kv_bytes_final)
                );
            }
            let _ = writeln!(
                out,
                "  prefill {:.2}× faster, first token {:.2}× faster (theory: {:.2}× fewer prefill FLOPs)",
                ms.prefill_speedup,
                ms.ttft_speedup,
                b.prefill.total as f64 / r.prefill.total.max(1) as f64
            );
        }
        out
    }
}

fn span_name(s: &SpanKind) -> String {
    match s {
        SpanKind::Image => "image tokens".into(),
        SpanKind::Prompt { protect_last } => format!("prompt, last {protect_last} kept"),
        SpanKind::Range { start, end } => format!("positions {start}..{end}"),
    }
}

fn pct(f: f64) -> String {
    format!("{:.1} %", f * 100.0)
}

/// 1536 → "1.5 KiB": memory in binary units, as pare's other commands print it.
pub fn bytes(v: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = v as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < units.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v} B")
    } else {
        format!("{x:.1} {}", units[i])
    }
}

fn flops(v: u64) -> String {
    human(v as f64)
}

/// 1234567 → "1.23 M": three significant digits with an SI prefix.
pub fn human(v: f64) -> String {
    let prefixes = ["", "k", "M", "G", "T", "P", "E"];
    let mut v = v;
    let mut i = 0;
    while v.abs() >= 1000.0 && i + 1 < prefixes.len() {
        v /= 1000.0;
        i += 1;
    }
    let digits = if i == 0 || v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else {
        2
    };
    let sep = if i == 0 { "" } else { " " };
    format!("{v:.digits$}{sep}{}", prefixes[i])
}

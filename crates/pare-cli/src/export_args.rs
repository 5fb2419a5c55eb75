//! Writing a changed model (pruned, or with an adapter merged) as an HF directory and, with
//! `--gguf`, a GGUF beside it: the flags and the report `pare prune` and `pare finetune` share.

use std::path::Path;

use anyhow::Result;
use pare_formats::{GgmlType, GgufFile, GgufValue};
use pare_model::Model;
use serde::Serialize;

#[derive(clap::Args, Debug, Clone)]
pub struct GgufArgs {
    /// Also write model.gguf into the model's directory.
    #[arg(long)]
    pub gguf: bool,
    /// GGUF matrix type.
    #[arg(long, value_enum, default_value_t = GgufDtypeArg::F16)]
    pub gguf_dtype: GgufDtypeArg,
}

/// `--gguf-dtype`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtypeArg {
    F16,
    F32,
}

impl GgufArgs {
    /// The GGUF matrix type, when `--gguf` asks for one.
    pub fn ggml_type(&self) -> Option<GgmlType> {
        self.gguf.then_some(match self.gguf_dtype {
            GgufDtypeArg::F16 => GgmlType::F16,
            GgufDtypeArg::F32 => GgmlType::F32,
        })
    }
}

#[derive(Serialize, Debug)]
pub struct ModelExport {
    pub dir: String,
    /// Whether transformers needs `trust_remote_code=True` (the directory's modeling_pare.py)
    /// because its own class cannot hold the model's shapes.
    pub trust_remote_code: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<String>,
    /// Which llama.cpp architecture model.gguf declares (`deci` when layers differ).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf_arch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf_note: Option<String>,
}

/// Write `model` into `staging` (what becomes `dir` once the output is committed): the HF files,
/// and model.gguf of type `gguf` with `tokenizer_keys` ([`gguf_tokenizer_keys`]) when given.
pub fn write_model(
    loaded: &pare_model::LoadedModel,
    model: &Model,
    dir: &Path,
    staging: &Path,
    gguf: Option<(GgmlType, &[(String, GgufValue)])>,
) -> Result<ModelExport> {
    pare_model::export::export_hf_dir(model, loaded.tokenizer.as_ref(), &loaded.eos_token_ids(), staging)?;
    let mut report = ModelExport {
        dir: dir.display().to_string(),
        trust_remote_code: pare_model::export::needs_remote_code(model),
        gguf: None,
        gguf_arch: None,
        gguf_note: None,
    };
    if let Some((ty, keys)) = gguf {
        if keys.is_empty() {
            report.gguf_note =
                Some("the source has no tokenizer, so model.gguf carries none; llama.cpp needs one".into());
        }
        pare_model::export::export_gguf(model, keys, ty, &staging.join("model.gguf"))?;
        report.gguf = Some(dir.join("model.gguf").display().to_string());
        report.gguf_arch = Some(pare_model::export::gguf_architecture(model).to_string());
    }
    Ok(report)
}

/// The `tokenizer.*` keys for a GGUF of `loaded`: a GGUF source's own, or those llama.cpp's
/// converter writes for an HF source's tokenizer; none for a source without a tokenizer.
/// Called before any work, so that a tokenizer llama.cpp would not take stops the command early.
pub fn gguf_tokenizer_keys(loaded: &pare_model::LoadedModel) -> Result<Vec<(String, GgufValue)>> {
    if loaded.format == "gguf" {
        let src = GgufFile::open(&loaded.path)?;
        return Ok(src
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect());
    }
    match &loaded.tokenizer {
        Some(t) => Ok(t.gguf_metadata(loaded.model.config().vocab_size)?),
        None => Ok(Vec::new()),
    }
}

/// The notes a user needs about what was written.
pub fn print_export(e: &ModelExport) {
    if e.trust_remote_code {
        println!(
            "note: transformers loads it with trust_remote_code=True (modeling_pare.py): its own class \
             cannot hold these shapes"
        );
    }
    if let (Some(g), Some(arch)) = (&e.gguf, &e.gguf_arch) {
        println!("wrote {g} (llama.cpp architecture {arch})");
    }
    if let Some(note) = &e.gguf_note {
        println!("note: {note}");
    }
}

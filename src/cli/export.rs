//! `lntune export`: adapters and merged models in the formats other tools read.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::jobs::export::{export_hf, export_peft};
use crate::jobs::export_gguf::{GgufType, export_gguf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub what: ExportWhat,
}

#[derive(Subcommand, Debug)]
pub enum ExportWhat {
    /// An ln, ln-simple or lora adapter as a PEFT adapter directory (`LN_TUNING` or `LORA`)
    /// that `PeftModel.from_pretrained(base, OUT)` loads
    Peft(ExportPeftArgs),
    /// A merged checkpoint directory (the base's format and key layout, the adapter folded
    /// into the weights, sharded, with its config, tokenizer and processor files) that
    /// transformers' `from_pretrained` loads with no PEFT
    Hf(ExportHfArgs),
    /// The LLM with the adapter merged as a llama.cpp GGUF file (norms F32; under
    /// `--type keep` unchanged tensors copied byte for byte). The vision tower and projector
    /// are not part of it
    Gguf(ExportGgufArgs),
}

#[derive(Args, Debug)]
pub struct ExportGgufArgs {
    /// The base model (.gguf file, composed directory, llava-hf or HF LLM directory)
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter to merge (lntune's or a PEFT LN_TUNING / LORA directory); none: the base
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The .gguf file to write (replaced when complete)
    #[arg(long)]
    pub out: PathBuf,
    /// Tensor types: keep (the base's), f16 or q8_0 for the matrices
    #[arg(long = "type", value_enum, default_value_t = GgufType::Keep)]
    pub ty: GgufType,
}

#[derive(Args, Debug)]
pub struct ExportHfArgs {
    /// The base model (llava-hf directory or HF LLM directory)
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter to merge (lntune's or a PEFT LN_TUNING / LORA directory); none: a copy
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The directory to write (replaced as a whole)
    #[arg(long)]
    pub out: PathBuf,
    /// Largest shard in MB (10^6 bytes); more tensors go to further shards with an index
    #[arg(long, default_value_t = 5000)]
    pub max_shard_size: usize,
}

#[derive(Args, Debug)]
pub struct ExportPeftArgs {
    /// The base model the adapter was trained on (llava-hf directory or HF LLM directory)
    #[arg(long)]
    pub model: PathBuf,
    /// The lntune adapter directory
    #[arg(long)]
    pub adapter: PathBuf,
    /// The PEFT adapter directory to write (replaced as a whole)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: ExportArgs) -> Result<()> {
    match args.what {
        ExportWhat::Peft(a) => {
            let n = export_peft(&a.model, &a.adapter, &a.out)?;
            println!("wrote {} ({n} tensors)", a.out.display());
            Ok(())
        }
        ExportWhat::Hf(a) => {
            crate::util::checks::positive("--max-shard-size", a.max_shard_size)?;
            let bytes = a.max_shard_size.saturating_mul(1_000_000);
            let r = export_hf(&a.model, a.adapter.as_deref(), &a.out, bytes)?;
            if a.model.join("compose.json").exists() {
                println!(
                    "composed model: {} holds compose.json, the vision tower (copied), the projector and an HF causal-LM directory for the LLM (what transformers can load)",
                    a.out.display()
                );
            }
            println!(
                "wrote {}: {} tensors ({} merged from the adapter) in {} shard(s)",
                a.out.display(),
                r.tensors,
                r.merged,
                r.shards
            );
            Ok(())
        }
        ExportWhat::Gguf(a) => {
            let r = export_gguf(&a.model, a.adapter.as_deref(), &a.out, a.ty)?;
            println!(
                "wrote {}: {} tensors ({} merged from the adapter, {} copied byte for byte)",
                a.out.display(),
                r.tensors,
                r.merged,
                r.copied
            );
            if r.retyped > 0 {
                println!(
                    "note: {} merged tensor(s) written as F16: lntune cannot encode their type in the base",
                    r.retyped
                );
            }
            if !r.left_out.is_empty() {
                println!(
                    "note: {} trained tensor(s) outside the LLM are not in the GGUF (first: {}); the vision side stays with lntune",
                    r.left_out.len(),
                    r.left_out[0]
                );
            }
            if let Some(why) = r.no_tokenizer {
                println!(
                    "note: no tokenizer metadata written ({why}); llama.cpp needs one, transformers' GGUF loader does not"
                );
            }
            Ok(())
        }
    }
}

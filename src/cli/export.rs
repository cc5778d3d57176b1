//! `lntune export`: adapters and merged models in the formats other tools read.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::jobs::export::{export_hf, export_peft};

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
            println!(
                "wrote {}: {} tensors ({} merged from the adapter) in {} shard(s)",
                a.out.display(),
                r.tensors,
                r.merged,
                r.shards
            );
            Ok(())
        }
    }
}

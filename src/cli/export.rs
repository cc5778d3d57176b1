//! `lntune export`: adapters in the formats other tools read.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::jobs::export::export_peft;

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
    }
}

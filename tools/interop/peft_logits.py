#!/usr/bin/env python3
"""The transformers + PEFT side of lntune's interop tests (tests/interop.rs).

  peft_logits.py logits --base DIR [--adapter DIR] --batch F --out F
      logits of LlavaForConditionalGeneration (DIR) with a PEFT adapter, on a batch file
      (input_ids, attention_mask, pixel_values), saved as {"logits": f32}
  peft_logits.py lm-logits --base DIR|F.gguf --batch F --out F
      logits of AutoModelForCausalLM (an HF directory, or a GGUF file through transformers'
      GGUF loader, dequantized to f32) on a text batch file (input_ids, attention_mask)
  peft_logits.py make-ln --base DIR --out DIR [--simple] [--seed S]
      a PEFT LN_TUNING adapter (PEFT's default llava targets, or only the decoder's norms
      with --simple) whose tensors are the base's, perturbed by a seeded 10% noise
  peft_logits.py make-lora --base DIR --out DIR [--seed S]
      a PEFT LoRA adapter (r 4, alpha 8, on q, v and down of the decoder; the projector as
      a module to save) with seeded random factors and a perturbed projector
"""
import argparse
import warnings

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")


def load_base(path):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def logits(args):
    model = load_base(args.base)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter).eval()
    b = load_file(args.batch)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    pixel_values=b["pixel_values"])
    save_file({"logits": out.logits.float().contiguous()}, args.out)


def lm_logits(args):
    import os
    from transformers import AutoModelForCausalLM
    if os.path.isdir(args.base):
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    else:
        d, f = os.path.split(os.path.abspath(args.base))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    b = load_file(args.batch)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    save_file({"logits": out.logits.float().contiguous()}, args.out)


def make_ln(args):
    from peft import LNTuningConfig, get_peft_model
    model = load_base(args.base)
    cfg = LNTuningConfig(task_type="CAUSAL_LM")
    if args.simple:
        cfg = LNTuningConfig(task_type="CAUSAL_LM",
                             target_modules=["input_layernorm", "post_attention_layernorm", "norm"])
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_tuning_layers" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(args.out)


def make_lora(args):
    from peft import LoraConfig, get_peft_model
    model = load_base(args.base)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=r".*language_model\.layers\.\d+\.(self_attn\.(q|v)_proj|mlp\.down_proj)",
                     modules_to_save=["multi_modal_projector"])
    model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(args.out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["logits", "lm-logits", "make-ln", "make-lora"])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--batch")
    ap.add_argument("--out", required=True)
    ap.add_argument("--simple", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    {"logits": logits, "lm-logits": lm_logits, "make-ln": make_ln, "make-lora": make_lora}[args.mode](args)


if __name__ == "__main__":
    main()

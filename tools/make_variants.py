#!/usr/bin/env python3
"""Writes tests/fixtures/variants/: small llava-hf checkpoints in layouts and settings that the
two hand-documented fixtures do not cover, with logits and loss computed by HF transformers.

Not needed to run the tests (the outputs are committed). To regenerate:

    python3 -m venv venv && venv/bin/pip install torch transformers==5.24.0 safetensors
    venv/bin/python tools/make_variants.py tests/fixtures/variants

Every variant: seeded HF init, then norm weights 1 + 0.1 N(0,1), norm/projector biases
0.05 N(0,1), so that a missing scale or shift is visible; fp32, eager attention, eval mode,
CPU, 1 thread. Batch: image tokens pre-expanded, right padding unless stated, labels = -100
except on an answer span, pixel_values N(0,1). expected.safetensors: logits, loss.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, Qwen2Config)

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def text_cfg(kind, **kw):
    base = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-5,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind](**base)


def clip_cfg(**kw):
    base = dict(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=3,
                num_attention_heads=2, intermediate_size=64, projection_dim=32,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
    base.update(kw)
    return CLIPVisionConfig(**base)


VARIANTS = {
    # G = 4 GQA, explicit head_dim != hidden/heads, tied head, strategy full, last layer,
    # gelu tower, llama3 rope scaling, several images in one sample and none in another
    "gqa4-tied-full": dict(
        text=text_cfg("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=True,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}),
        vision=clip_cfg(hidden_act="gelu"), layer=-1, strategy="full", tie=True,
        images=[2, 0, 1]),
    # MHA, two feature layers concatenated, linear rope scaling, hub key layout
    # (vision_tower.vision_model.*), sharded files
    "mha-layers-sharded-hub": dict(
        text=text_cfg("llama", num_key_value_heads=4,
                      rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                       "factor": 2.0}),
        vision=clip_cfg(), layer=[-3, -2], strategy="default", hub_keys=True, shard=True,
        images=[1, 1]),
    # Qwen2 decoder (q/k/v biases), theta 1e6, projector without bias, gelu_pytorch_tanh act
    "qwen2-bias": dict(
        text=text_cfg("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        vision=clip_cfg(), layer=-2, strategy="default", projector_bias=False,
        projector_act="gelu_pytorch_tanh", images=[1, 1]),
    # Mistral decoder, DINOv2 tower on a non-square 28x42 input (position interpolation),
    # LLaVA-style hidden state (before the final layernorm), left padding
    "mistral-dinov2-interp": dict(
        text=text_cfg("mistral", sliding_window=4096),
        vision=Dinov2Config(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, mlp_ratio=2, layer_norm_eps=1e-6,
                            hidden_act="gelu"),
        layer=-1, strategy="default", pixel_hw=(28, 42), left_pad=True, images=[1, 1]),
}


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif ("norm" in name or "multi_modal_projector" in name) and name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif name.endswith("lambda1"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "position_embeddings" in name or "cls_token" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def make(name, v, out_root, seed):
    torch.manual_seed(seed)
    vision = v["vision"]
    ph, pw = v.get("pixel_hw", (vision.image_size, vision.image_size))
    n_patch = (ph // vision.patch_size) * (pw // vision.patch_size)
    per_image = n_patch + (1 if v["strategy"] == "full" else 0)
    image_token = v["text"].vocab_size - 1
    cfg = LlavaConfig(vision_config=vision, text_config=v["text"],
                      image_token_index=image_token, image_seq_length=per_image,
                      projector_hidden_act=v.get("projector_act", "gelu"),
                      vision_feature_layer=v["layer"],
                      vision_feature_select_strategy=v["strategy"],
                      multimodal_projector_bias=v.get("projector_bias", True),
                      tie_word_embeddings=v.get("tie", False))
    cfg._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(cfg).eval()
    perturb(model, seed + 1)
    out = os.path.join(out_root, name)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, max_shard_size="150KB" if v.get("shard") else "1GB")
    if v.get("hub_keys"):
        rewrite_hub_keys(out)

    g = torch.Generator().manual_seed(seed + 2)
    images = v["images"]
    rows = []
    for n_img in images:
        prompt = torch.randint(3, image_token, (3,), generator=g).tolist()
        answer = torch.randint(3, image_token, (5,), generator=g).tolist()
        ids = [1] + prompt
        for _ in range(n_img):
            ids += [image_token] * per_image + torch.randint(3, image_token, (2,), generator=g).tolist()
        ids += answer + [2]
        labels = [-100] * (len(ids) - len(answer) - 1) + answer + [2]
        rows.append((ids, labels))
    t = max(len(r[0]) for r in rows) + 2
    input_ids, mask, labels = [], [], []
    for ids, lab in rows:
        pad = t - len(ids)
        if v.get("left_pad"):
            input_ids.append([0] * pad + ids)
            mask.append([0] * pad + [1] * len(ids))
            labels.append([-100] * pad + lab)
        else:
            input_ids.append(ids + [0] * pad)
            mask.append([1] * len(ids) + [0] * pad)
            labels.append(lab + [-100] * pad)
    batch = {
        "input_ids": torch.tensor(input_ids, dtype=torch.int64),
        "attention_mask": torch.tensor(mask, dtype=torch.int64),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "pixel_values": torch.randn((sum(images), 3, ph, pw), generator=g),
    }
    with torch.no_grad():
        res = model(**batch)
    save_file({k: x.contiguous() for k, x in batch.items()}, os.path.join(out, "batch.safetensors"))
    save_file({"logits": res.logits.contiguous(), "loss": res.loss.reshape(())},
              os.path.join(out, "expected.safetensors"))
    print(f"{name}: loss {res.loss.item():.6f}, logits {tuple(res.logits.shape)}")


def rewrite_hub_keys(out):
    """Renames `vision_tower.X` to `vision_tower.vision_model.X` in every shard and index."""
    from safetensors.torch import load_file
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    for f in files:
        path = os.path.join(out, f)
        t = load_file(path)
        t = {("vision_tower.vision_model." + k[len("vision_tower."):]
              if k.startswith("vision_tower.") else k): x for k, x in t.items()}
        save_file(t, path, metadata={"format": "pt"})
    idx = os.path.join(out, "model.safetensors.index.json")
    if os.path.exists(idx):
        j = json.load(open(idx))
        j["weight_map"] = {("vision_tower.vision_model." + k[len("vision_tower."):]
                            if k.startswith("vision_tower.") else k): f
                           for k, f in j["weight_map"].items()}
        json.dump(j, open(idx, "w"), indent=2)


if __name__ == "__main__":
    root = sys.argv[1]
    for i, (name, v) in enumerate(VARIANTS.items()):
        make(name, v, root, 100 + 10 * i)

"""Write the tiny random LLaVA-1.5 checkpoint and its HF reference fixtures (tests/fixtures/llava-tiny/).

    tools/reference/.venv/bin/python tools/reference/make_llava_fixtures.py

No LLaVA weights are small enough to commit, so parity is proven on a seeded random
LlavaForConditionalGeneration with LLaVA-1.5's structure: a CLIP ViT tower (features of layer
-2, CLS dropped), a two-layer GELU projector and a Llama decoder, plus a byte-level tokenizer
with an `<image>` token and a CLIP image processor. Files:

  model/             config.json, model.safetensors, tokenizer, processor configs
  images/            small PNGs (RGB, RGBA with transparency, grayscale) and one JPEG
  preprocess.json    pixel values from HF's PIL image processor (CLIPImageProcessorPil) for
                     each image under several processor settings
  logits.json        full-prefill logits at every position, the image features after the
                     projector, and 8 greedy tokens of HF generate, for two prompts
  meta.json          how the files were made

The image processor reference is the PIL backend: transformers 5's torchvision backend resizes
uint8 images with CPU-dependent kernels (AVX2 or not), so it is no fixed reference. Needs
Pillow in the venv (`pip install pillow==12.0.0`). Float32, eager attention throughout.
"""

import datetime
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import PIL
import PIL.Image
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "llava-tiny"
MODEL = OUT / "model"
IMAGES = OUT / "images"

SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]
IMAGE_TOKEN_ID = 3
GREEDY_TOKENS = 8
DIGITS = 6

# The model's own processor: shortest edge 28, center crop 28×28, bicubic (LLaVA-1.5 at 1/12 scale).
PROCESSOR = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3)
# Other settings the preprocessing test covers: bilinear with a non-square crop, a crop larger
# than the resized image (zero padding), an exact (height, width) resize, and a lanczos filter.
EXTRA_SETTINGS = {
    "bilinear_crop_16x18": dict(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 18}, resample=2),
    "crop_pads_20x24": dict(size={"shortest_edge": 17}, crop_size={"height": 20, "width": 24}, resample=3),
    "exact_size_lanczos": dict(size={"height": 23, "width": 30}, crop_size={"height": 21, "width": 21}, resample=1),
}


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer():
    """Byte-level BPE without merges: ids 0..3 are special, 4..259 the 256 byte symbols."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )


def config():
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        projection_dim=32,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=96,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=16,
        tie_word_embeddings=False,
    )


def build():
    """Random weights; 1-D parameters (norms, biases) perturbed off HF's 1/0 init, as make_tiny_models.py."""
    torch.manual_seed(21)
    model = LlavaForConditionalGeneration(config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("class_embedding"):
                base = 0.0 if name.endswith(".bias") else 1.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            elif "vision_tower" in name or "multi_modal_projector" in name:
                # CLIP's default init is tiny; larger weights make the image visibly move the logits.
                p.copy_(0.2 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model.eval()


def write_images():
    IMAGES.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:31, 0:45]
    rgb = np.stack([xx * 5, yy * 8, (xx + yy) * 3], -1) + rng.integers(0, 40, (31, 45, 3))
    PIL.Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(IMAGES / "rgb_45x31.png")
    rgba = rng.integers(0, 256, (37, 20, 4)).astype(np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent rows: white after compositing
    rgba[10:20, :, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(IMAGES / "rgba_20x37.png")
    yy, xx = np.mgrid[0:64, 0:97]
    gray = ((np.sin(xx / 3.0) + np.cos(yy / 5.0)) * 60 + 128 + rng.integers(-20, 20, (64, 97)))
    PIL.Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), "L").save(IMAGES / "gray_97x64.png")
    PIL.Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB").save(IMAGES / "rgb_45x31.jpg", quality=90)
    return ["rgb_45x31.png", "rgba_20x37.png", "gray_97x64.png"]


def pixels(proc, name):
    return proc(images=PIL.Image.open(IMAGES / name), return_tensors="pt")["pixel_values"][0]


def rounded(t):
    return [round(float(x), DIGITS) for x in t.reshape(-1).tolist()]


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    MODEL.mkdir(parents=True)
    names = write_images()

    tok = tokenizer()
    image_processor = CLIPImageProcessorPil(**PROCESSOR)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    model = build()
    model.save_pretrained(MODEL)
    processor.save_pretrained(MODEL)
    # Hub LLaVA checkpoints carry preprocessor_config.json; transformers 5 nests it in
    # processor_config.json. pare reads either; keep the classic file as real checkpoints have it.
    (MODEL / "preprocessor_config.json").write_text(json.dumps(image_processor.to_dict(), indent=2) + "\n")

    cases = []
    for name in names:
        cases.append(dict(image=name, setting="model", processor=PROCESSOR, shape=list(pixels(image_processor, name).shape),
                          pixel_values=rounded(pixels(image_processor, name))))
    for setting, kwargs in EXTRA_SETTINGS.items():
        proc = CLIPImageProcessorPil(**kwargs)
        for name in names[:2]:
            pv = pixels(proc, name)
            cases.append(dict(image=name, setting=setting, processor=kwargs, shape=list(pv.shape), pixel_values=rounded(pv)))
    (OUT / "preprocess.json").write_text(json.dumps(dict(digits=DIGITS, cases=cases)) + "\n")

    prompts = [
        ("rgb_45x31.png", "USER: <image>\nWhat is in the picture? ASSISTANT:"),
        ("gray_97x64.png", "A photo <image> of"),
    ]
    logit_cases = []
    for image, text in prompts:
        inputs = processor(images=PIL.Image.open(IMAGES / image), text=text, return_tensors="pt")
        ids, pv = inputs["input_ids"], inputs["pixel_values"]
        assert int((ids == IMAGE_TOKEN_ID).sum()) == 16, ids
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pv, attention_mask=inputs["attention_mask"]).logits[0]
            blank = model(input_ids=ids, pixel_values=torch.zeros_like(pv)).logits[0]
            # The fixture must notice a wrong image path: the image has to move the logits.
            assert (logits - blank).abs().max() > 0.5, (logits - blank).abs().max()
            features = model.model.get_image_features(
                pixel_values=pv, vision_feature_layer=-2, vision_feature_select_strategy="default"
            ).pooler_output[0]
            out = model.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False)
        logit_cases.append(
            dict(
                image=image,
                prompt=text,
                input_ids=ids[0].tolist(),
                pixel_values=rounded(pv[0]),
                image_features_shape=list(features.shape),
                image_features=rounded(features),
                logits_shape=list(logits.shape),
                logits=rounded(logits),
                greedy=out[0, ids.shape[1]:].tolist(),
            )
        )
    (OUT / "logits.json").write_text(json.dumps(dict(digits=DIGITS, cases=logit_cases)) + "\n")

    meta = dict(
        command="tools/reference/.venv/bin/python tools/reference/make_llava_fixtures.py",
        date=datetime.date.today().isoformat(),
        versions=dict(transformers=transformers.__version__, torch=torch.__version__, pillow=PIL.__version__),
        model=dict(cls="LlavaForConditionalGeneration", seed=21, dtype="float32", attn_implementation="eager",
                   num_parameters=model.num_parameters()),
        image_processor="CLIPImageProcessorPil (PIL backend)",
        files={str(p.relative_to(OUT)): sha256(p) for p in sorted(OUT.rglob("*")) if p.is_file()},
    )
    (OUT / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"llava-tiny: {OUT.relative_to(ROOT)} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

//! LLaVA-1.5 against HF transformers on the tiny random checkpoint that
//! tools/reference/make_llava_fixtures.py writes (tests/fixtures/llava-tiny/).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use pare_model::Hooks;
use pare_model::WeightDType;
use pare_test_support as ts;
use pare_vision::preprocess::{ImageProcessor, PixelValues};
use pare_vision::{load_image, LoadedLlava};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava-tiny")
}

fn read(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn load() -> LoadedLlava {
    LoadedLlava::load(&fixtures().join("model"), WeightDType::Float(DType::F32), &Device::Cpu).unwrap()
}

#[test]
fn preprocessing_matches_hf_clip_image_processor() {
    let cases = read("preprocess.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let image = load_image(&fixtures().join("images").join(case["image"].as_str().unwrap())).unwrap();
        let processor = ImageProcessor::from_json(&case["processor"], "fixture").unwrap();
        let out = processor.preprocess(&image).unwrap();
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(vec![3, out.height, out.width], shape, "{case:?}");
        // The fixture keeps 6 decimals: 1e-5 is a tolerance of a rounding, not of a grey level.
        let diff = max_diff(&out.data, &floats(&case["pixel_values"]));
        assert!(diff < 1e-5, "{} / {}: max diff {diff}", case["image"], case["setting"]);
    }
}

#[test]
fn the_model_directory_supplies_its_processor() {
    let from_dir = ImageProcessor::from_dir(&fixtures().join("model")).unwrap();
    let first = &read("preprocess.json")["cases"][0];
    assert_eq!(from_dir, ImageProcessor::from_json(&first["processor"], "fixture").unwrap());
    assert_eq!(from_dir.output_size(45, 31), (28, 28));
}

#[test]
fn jpeg_decodes_close_to_its_png_twin() {
    // Decoders differ from libjpeg by a level or two; only PNG is a bit-exact reference.
    let jpeg = load_image(&fixtures().join("images/rgb_45x31.jpg")).unwrap();
    let png = load_image(&fixtures().join("images/rgb_45x31.png")).unwrap();
    assert_eq!((jpeg.width, jpeg.height), (45, 31));
    let mean_abs: f64 = jpeg.data.iter().zip(&png.data).map(|(&a, &b)| (a as f64 - b as f64).abs()).sum::<f64>()
        / png.data.len() as f64;
    assert!(mean_abs < 12.0, "mean abs difference {mean_abs}");
}

#[test]
fn bad_images_are_errors() {
    let dir = std::env::temp_dir().join(format!("pare-vision-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let err = load_image(&junk).unwrap_err().to_string();
    assert!(err.contains("cannot read the image"), "{err}");
    assert!(load_image(&dir.join("missing.png")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn pixel_values(case: &Value) -> PixelValues {
    PixelValues { height: 28, width: 28, data: floats(&case["pixel_values"]) }
}

fn ids(case: &Value) -> Vec<u32> {
    case["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn prefill_logits_and_image_features_match_hf() {
    let llava = load();
    let m = &llava.model;
    assert_eq!(m.config.image_tokens(), 16);
    assert_eq!(m.vision.layers.len(), 2, "layer -2 of 3 needs two layers run");
    for case in read("logits.json")["cases"].as_array().unwrap() {
        let pv = pixel_values(case).to_tensor(DType::F32, &Device::Cpu).unwrap();
        let ids = ids(case);
        let features = m.image_features(&pv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let fdiff = max_diff(&features, &floats(&case["image_features"]));
        assert!(fdiff < 1e-4, "{}: image features differ by {fdiff}", case["prompt"]);
        let logits = m.logits_all(&ids, &pv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_diff(&logits, &floats(&case["logits"]));
        assert!(diff < 1e-4, "{}: logits differ by {diff}", case["prompt"]);
    }
}

#[test]
fn pixel_values_from_the_image_file_give_hf_logits() {
    // The whole path: PNG → preprocess → tower → projector → decoder.
    let llava = load();
    let case = &read("logits.json")["cases"][0];
    let pv = llava.processor.preprocess_file(&fixtures().join("images").join(case["image"].as_str().unwrap())).unwrap();
    assert!(max_diff(&pv.data, &floats(&case["pixel_values"])) < 1e-5);
    let (logits, _) = llava
        .model
        .prefill(&ids(case), &pv.to_tensor(DType::F32, &Device::Cpu).unwrap(), &mut Hooks::default())
        .unwrap();
    let last = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
    let all = floats(&case["logits"]);
    let vocab = last.len();
    assert!(max_diff(&last, &all[all.len() - vocab..]) < 1e-4);
}

#[test]
fn greedy_decoding_over_the_prefill_cache_matches_hf_generate() {
    let llava = load();
    let m = &llava.model;
    for case in read("logits.json")["cases"].as_array().unwrap() {
        let pv = pixel_values(case).to_tensor(DType::F32, &Device::Cpu).unwrap();
        let want: Vec<u32> = case["greedy"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let (mut logits, mut cache) = m.prefill(&ids(case), &pv, &mut Hooks::default()).unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let row = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let next = pare_generate_argmax(&row);
            got.push(next);
            logits = ts::decode(&m.language, &mut cache, &[next]).unwrap();
        }
        assert_eq!(got, want, "{}", case["prompt"]);
    }
}

fn pare_generate_argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn prompt_text_expands_the_image_marker_like_the_hf_processor() {
    let llava = load();
    for case in read("logits.json")["cases"].as_array().unwrap() {
        assert_eq!(llava.prompt_ids(case["prompt"].as_str().unwrap()).unwrap(), ids(case));
    }
    // Without a marker the image goes first, as LLaVA's own code puts it.
    let ids = llava.prompt_ids("Describe it.").unwrap();
    assert_eq!(llava.model.image_positions(&ids), (1..17).collect::<Vec<i64>>());
    let err = llava.prompt_ids("<image> and <image>").unwrap_err().to_string();
    assert!(err.contains("one image per prompt"), "{err}");
}

#[test]
fn a_placeholder_count_that_does_not_fit_the_image_is_an_error() {
    let llava = load();
    let case = &read("logits.json")["cases"][0];
    let pv = pixel_values(case).to_tensor(DType::F32, &Device::Cpu).unwrap();
    let mut short = ids(case);
    let first = short.iter().position(|&t| t == 3).unwrap();
    short.remove(first);
    let err = llava.model.prefill(&short, &pv, &mut Hooks::default()).unwrap_err().to_string();
    assert!(err.contains("15 image placeholder tokens"), "{err}");
    let wrong_size = candle_core::Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(llava.model.prefill(&ids(case), &wrong_size, &mut Hooks::default()).is_err());
}

#[test]
fn hub_style_configs_fill_in_hf_defaults() {
    // llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36): most sizes are left to defaults.
    let json: Value = serde_json::from_str(
        r#"{"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
            "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
            "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
              "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
              "vocab_size": 32064},
            "tie_word_embeddings": false, "torch_dtype": "float16",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
              "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
              "projection_dim": 768, "vocab_size": 32000},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}"#,
    )
    .unwrap();
    let cfg = pare_vision::LlavaConfig::from_json(&json, "config.json").unwrap();
    assert_eq!(cfg.image_tokens(), 576);
    assert_eq!(cfg.vision_layers_needed(), 23);
    assert_eq!(
        (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.intermediate_size, cfg.text.vocab_size),
        (4096, 32, 11008, 32064)
    );
    let mut bad = json.clone();
    bad["vision_feature_layer"] = (-30).into();
    assert!(pare_vision::LlavaConfig::from_json(&bad, "config.json").is_err());
}

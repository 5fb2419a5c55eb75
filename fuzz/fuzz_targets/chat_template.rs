//! A tokenizer_config.json (its chat_template, special tokens) beside a fixed small tokenizer,
//! then the template rendered; an input that is not JSON is rendered as a template itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pare_formats::{render_chat, ChatMessage, TokenizerBundle};

const TOKENIZER: &str = include_str!("../../tests/fixtures/llava-tiny/model/tokenizer.json");

fn render(template: &str, bos: Option<&str>, eos: Option<&str>) {
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hello"),
        ChatMessage::new("assistant", "Hi"),
        ChatMessage::new("user", "Bye"),
    ];
    let _ = render_chat(template, &messages, true, bos, eos);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if serde_json::from_str::<serde_json::Value>(text).is_err() {
        render(text, Some("<s>"), Some("</s>"));
        return;
    }
    let dir = std::env::temp_dir().join(format!("pare-fuzz-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("chat_template.jinja"));
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), text).unwrap();
    if let Ok(bundle) = TokenizerBundle::from_hf_dir(&dir) {
        if let Some(template) = &bundle.chat_template {
            render(template, bundle.bos_token.as_deref(), bundle.eos_token.as_deref());
        }
    }
});

//! Chat templates against transformers 5.23's `apply_chat_template` (expected strings and ids in
//! `tests/data/hf_chat.json`, produced from the two GGUFs' own templates).

mod common;

use common::*;
use pare_formats::{render_chat, ChatMessage, FormatError, GgufFile, TokenizerBundle};

fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn real_templates_match_transformers() {
    let data = read_json("hf_chat.json");
    for (tag, path) in [("smollm2", smollm2_path()), ("qwen2", qwen2_path())] {
        let tok = TokenizerBundle::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let template = tok.chat_template.clone().unwrap();
        assert_eq!(template, data[tag]["template"].as_str().unwrap());
        let cases = data[tag]["cases"].as_object().unwrap();
        assert_eq!(cases.len(), 6);
        for (name, case) in cases {
            let text = render_chat(
                &template,
                &messages(&case["messages"]),
                case["add_generation_prompt"].as_bool().unwrap(),
                tok.bos_token.as_deref(),
                tok.eos_token.as_deref(),
            )
            .unwrap();
            assert_eq!(text, case["text"].as_str().unwrap(), "{tag} {name}");
            let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(tok.encode(&text, false).unwrap(), ids, "{tag} {name}");
        }
    }
}

#[test]
fn one_user_message_hardcoded() {
    let data = read_json("hf_chat.json");
    let msgs = [ChatMessage::new("user", "What is the capital of France?")];
    let qwen = render_chat(data["qwen2"]["template"].as_str().unwrap(), &msgs, true, None, None).unwrap();
    assert_eq!(
        qwen,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    let smol = render_chat(data["smollm2"]["template"].as_str().unwrap(), &msgs, true, None, None).unwrap();
    assert_eq!(
        smol,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// Filters, functions and syntax transformers' Jinja environment provides; the expected
/// strings were rendered by its `_compile_jinja_template`.
#[test]
fn jinja_environment_matches_transformers() {
    let msgs = [ChatMessage::new("user", "héllo \"q\" <b>&'\n\t"), ChatMessage::new("assistant", "x")];
    let t1 = "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson }}|{{ [] | tojson(indent=2) }}|{{ 'é' | tojson(ensure_ascii=True) }}|{{ {'z':1,'y':2} | tojson(sort_keys=True, separators=(',', ':')) }}|{{ 1e20 | tojson }}|{{ 0.5 | tojson }}";
    assert_eq!(
        render_chat(t1, &msgs, false, None, None).unwrap(),
        "[{\"role\": \"user\", \"content\": \"h\u{e9}llo \\\"q\\\" <b>&'\\n\\t\"}, {\"role\": \"assistant\", \"content\": \"x\"}]|{\n  \"role\": \"user\",\n  \"content\": \"h\u{e9}llo \\\"q\\\" <b>&'\\n\\t\"\n}|{\"b\": [1, 2.5, null, true], \"a\": {}}|[]|\"\\u00e9\"|{\"y\":2,\"z\":1}|1e+20|0.5"
    );
    let t2 = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}[{{ m.content.strip().upper() }}]{% endfor %}\n  {% if tools is none %}no tools{% endif %}\n{{ messages[0].role.startswith('us') }}|{{ 'a,b'.split(',') | join('-') }}|{{ bos_token }}|{{ eos_token }}";
    assert_eq!(
        render_chat(t2, &msgs, false, Some("<s>"), Some("</s>")).unwrap(),
        "[H\u{c9}LLO \"Q\" <B>&']no toolsTrue|a-b|<s>|</s>"
    );
    let t3 = "{{ none }} {{ false }} {{ [1, 'a', none, 2.0] }} {{ {'k': true} }} {{ add_generation_prompt }}";
    assert_eq!(render_chat(t3, &msgs, true, None, None).unwrap(), "None False [1, 'a', None, 2.0] {'k': True} True");
    // Python's strftime through a date-shaped result.
    let date = render_chat("{{ strftime_now('%Y-%m-%d') }}", &msgs, false, None, None).unwrap();
    assert!(date.len() == 10 && date.as_bytes()[4] == b'-' && date.starts_with("20"), "{date}");
}

#[test]
fn template_errors() {
    let msgs = [ChatMessage::new("system", "s")];
    let err = render_chat(
        "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
        &msgs,
        true,
        None,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, FormatError::Template(_)));
    let msg = err.to_string();
    assert!(msg.starts_with("chat template: ") && msg.contains("System role not supported"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    let err = render_chat("{% for m in messages %}", &msgs, true, None, None).unwrap_err();
    assert!(err.to_string().starts_with("chat template: "), "{err}");
    let err = render_chat("{{ messages | tojson(bogus=1) }}", &msgs, true, None, None).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}

#[test]
fn a_template_that_never_ends_is_stopped() {
    let msgs = [ChatMessage::new("user", "hi")];
    // 10^15 iterations: without a step limit this renders for days.
    let endless = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
                   {{ a }}{% endfor %}{% endfor %}{% endfor %}";
    let start = std::time::Instant::now();
    let err = render_chat(endless, &msgs, true, None, None).unwrap_err();
    assert!(err.to_string().contains("did not finish"), "{err}");
    assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
}

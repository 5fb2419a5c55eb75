//! Training records through SmolLM2's tokenizer and chat template: which tokens are labels.

use std::io::Write;

use pare_finetune::data::{self, Example};
use pare_formats::{GgufFile, TokenizerBundle};

fn tokenizer() -> TokenizerBundle {
    TokenizerBundle::from_gguf(&GgufFile::open(&pare_test_support::smollm2_path()).unwrap()).unwrap()
}

fn load(lines: &[&str], ext: &str, max_len: usize) -> data::Dataset {
    let mut file = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
    for line in lines {
        writeln!(file, "{line}").unwrap();
    }
    data::load(file.path(), Some(&tokenizer()), max_len, None).unwrap()
}

/// The text of the labelled tokens, runs joined by `|`.
fn labelled(tok: &TokenizerBundle, e: &Example) -> String {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (&id, &label) in e.ids.iter().zip(&e.labels) {
        if label {
            run.push(id);
        } else if !run.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut run), false).unwrap());
        }
    }
    if !run.is_empty() {
        runs.push(tok.decode(&run, false).unwrap());
    }
    runs.join("|")
}

#[test]
fn conversations_train_on_the_assistant_turns_only() {
    let tok = tokenizer();
    let d = load(
        &[
            r#"{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]}"#,
            r#"{"prompt": "What is 2+2?", "response": "Four."}"#,
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]}"#,
            r#"{"instruction": "Add", "input": "2 and 2", "output": "4"}"#,
            r#"{"text": "Plain text."}"#,
        ],
        ".jsonl",
        256,
    );
    assert_eq!((d.format, d.records, d.truncated, d.skipped), ("jsonl", 5, 0, 0));
    let e = &d.examples;
    assert_eq!(labelled(&tok, &e[0]), "Four.<|im_end|>\n");
    assert_eq!(e[0], e[1], "a prompt/response record is a two-turn chat");
    assert_eq!(labelled(&tok, &e[2]), "Hello!<|im_end|>\n|See you.<|im_end|>\n");
    assert_eq!(labelled(&tok, &e[3]), "4<|im_end|>\n");
    let rendered = tok.decode(&e[3].ids, false).unwrap();
    assert!(rendered.contains("Add\n\n2 and 2"), "{rendered}");
    assert!(e[4].labels.iter().all(|&l| l));
    assert_eq!(tok.decode(&e[4].ids, false).unwrap(), "Plain text.");
}

#[test]
fn long_records_are_cut_and_plain_text_is_cut_into_pieces() {
    let long = format!(r#"{{"prompt": "Say it.", "response": "{}"}}"#, "word ".repeat(100));
    let d =
        load(&[&long, r#"{"prompt": "{}", "response": "x"}"#.replace("{}", &"w ".repeat(100)).as_str()], ".jsonl", 40);
    assert_eq!((d.records, d.truncated, d.skipped, d.examples.len()), (2, 2, 1, 1));
    assert_eq!(d.examples[0].ids.len(), 40);

    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let d = load(&[&text], ".txt", 16);
    let whole = tokenizer().encode(&format!("{text}\n"), true).unwrap();
    assert_eq!(d.format, "text");
    let pieces: Vec<&[u32]> = whole.chunks(16).filter(|c| c.len() >= 2).collect();
    assert_eq!(d.examples.iter().map(|e| &e.ids[..]).collect::<Vec<_>>(), pieces);
    assert!(d.examples.iter().all(|e| e.labels.iter().all(|&l| l)));
}

#[test]
fn a_split_is_seeded_and_keeps_every_example() {
    let examples: Vec<Example> = (0..10).map(|i| Example { ids: vec![i, i + 1], labels: vec![true; 2] }).collect();
    let (a, b) = data::split(examples.clone(), 3, 7).unwrap();
    let (a2, b2) = data::split(examples.clone(), 3, 7).unwrap();
    assert_eq!((a.len(), b.len()), (7, 3));
    assert_eq!((&a, &b), (&a2, &b2));
    let mut all: Vec<u32> = a.iter().chain(&b).map(|e| e.ids[0]).collect();
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>());
    assert!(data::split(examples, 10, 7).is_err());
}

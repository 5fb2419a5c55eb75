//! HellaSwag (lm-eval `hellaswag`, validation set), with lm-eval's preprocessing: the query is
//! `{activity_label}: {ctx_a} {Ctx_b}` and every text loses WikiHow's bracketed artifacts.

use super::data::{text, texts, Doc};
use super::{Item, TaskError};

pub fn item(doc: &Doc) -> Result<Item, TaskError> {
    let ctx = format!("{} {}", text(doc, "ctx_a")?, capitalize(text(doc, "ctx_b")?));
    let query = preprocess(&format!("{}: {ctx}", text(doc, "activity_label")?));
    let choices = texts(doc, "endings")?.iter().map(|e| preprocess(e)).collect();
    let gold = text(doc, "label")?.parse().map_err(|_| TaskError::field(doc, "label", "a number"))?;
    Item::multiple_choice(&query, choices, gold, doc)
}

/// Python's `str.capitalize`: the first character upper-cased, the rest lower-cased.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars.flat_map(char::to_lowercase)).collect(),
        None => String::new(),
    }
}

/// lm-eval's `preprocess`: strip, ` [title]` → `. `, drop every `[…]`, then `"  "` → `" "`.
fn preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    // re.sub(r"\[.*?\]", "", text): a `[` opens only if a `]` follows somewhere.
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocessing_matches_python() {
        // Expected values from lm-eval's `preprocess` and `str.capitalize`.
        assert_eq!(preprocess(" Home [title] How to cook [step] Boil  water. "), "Home. How to cook Boil water.");
        assert_eq!(preprocess("a [b] c [d"), "a c [d");
        assert_eq!(preprocess("x   y"), "x  y");
        assert_eq!(capitalize("the LADY"), "The lady");
        assert_eq!(capitalize(""), "");
    }
}

//! Stop strings (HF `stop_strings`): a row ends once its generated text contains one, and the
//! text is cut where the stop string begins. [`TextStream`] turns a growing token sequence into
//! text that is safe to show as it comes.

/// The byte offset at which the earliest stop string starts in `text`, if any.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// The text of one generated sequence as it grows. Each update hands out only what can no longer
/// change: never an incomplete UTF-8 character (the tokenizer's U+FFFD), never the tail a stop
/// string could still cover, never anything from a stop string on.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    stops: Vec<String>,
    /// Bytes held back: the longest stop string less one.
    holdback: usize,
    /// What was handed out so far.
    emitted: String,
}

impl TextStream {
    pub fn new(stops: Vec<String>) -> Self {
        let holdback = stops.iter().map(String::len).max().unwrap_or(1).saturating_sub(1);
        TextStream { stops, holdback, emitted: String::new() }
    }

    /// The whole text decoded so far → the new part that is safe to show, and whether a stop
    /// string has appeared.
    pub fn update(&mut self, text: &str) -> (String, bool) {
        let stop = find_stop(text, &self.stops);
        let visible = &text[..stop.unwrap_or(text.len())];
        let safe = if stop.is_some() { visible.len() } else { visible.len().saturating_sub(self.holdback) };
        let mut delta = String::new();
        if !visible.ends_with('\u{FFFD}')
            && safe > self.emitted.len()
            && visible.is_char_boundary(safe)
            && visible.starts_with(&self.emitted)
        {
            delta = visible[self.emitted.len()..safe].to_string();
            self.emitted.push_str(&delta);
        }
        (delta, stop.is_some())
    }

    /// The final text (cut at a stop string) → what was not handed out yet.
    pub fn finish(&mut self, text: &str) -> String {
        let end = find_stop(text, &self.stops).unwrap_or(text.len());
        let rest = text[..end].strip_prefix(self.emitted.as_str()).unwrap_or_default().to_string();
        self.emitted.push_str(&rest);
        rest
    }

    /// The text with a stop string and all after it removed.
    pub fn cut(&self, text: &str) -> String {
        text[..find_stop(text, &self.stops).unwrap_or(text.len())].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_stop_wins() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc END x\n\n", &stops), Some(4));
        assert_eq!(find_stop("abc", &stops), None);
    }

    #[test]
    fn stream_holds_back_what_a_stop_could_still_claim() {
        let mut s = TextStream::new(vec!["END".into()]);
        assert_eq!(s.update("abc E"), ("abc".to_string(), false));
        assert_eq!(s.update("abc EN"), (" ".to_string(), false));
        assert_eq!(s.update("abc ENX"), ("E".to_string(), false));
        assert_eq!(s.update("abc ENX xxEND more"), ("NX xx".to_string(), true));
        assert_eq!(s.finish("abc ENX xxEND more"), "");
        assert_eq!(s.cut("abc ENX xxEND more"), "abc ENX xx");
    }

    #[test]
    fn stream_never_splits_a_character_and_finishes_the_rest() {
        let mut s = TextStream::new(vec![]);
        assert_eq!(s.update("h\u{FFFD}"), (String::new(), false));
        assert_eq!(s.update("hé"), ("hé".to_string(), false));
        let mut t = TextStream::new(vec!["\n\n".into()]);
        assert_eq!(t.update("one\n"), ("one".to_string(), false));
        assert_eq!(t.finish("one\ntwo"), "\ntwo");
    }
}

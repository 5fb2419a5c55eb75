//! Chat templates, rendered as transformers' `apply_chat_template` renders them.
//!
//! transformers compiles the template with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop
//! controls) and adds `raise_exception`, `strftime_now` and its own `tojson`; it passes the
//! messages, `tools` and `documents` (None unless given), `add_generation_prompt` and the
//! special tokens. minijinja with Python-method compatibility (`minijinja-contrib`'s pycompat),
//! Python's spelling of printed values and the same additions renders the templates models ship
//! identically. transformers then tokenizes the prompt without adding special tokens (the
//! template writes them): use `TokenizerBundle::encode(prompt, false)`.

mod pyjson;
mod pyrepr;
mod strftime;

use minijinja::{context, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Template steps a chat rendering may take. Real templates take a few hundred per message;
/// this bounds a hostile one to about a second.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// The environment transformers' `_compile_jinja_template` sets up, with a step limit.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(pyrepr::formatter);
    env.add_filter("tojson", pyjson::tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime::strftime_now);
    env
}

/// Renders `template` for `messages`. With `add_generation_prompt` the text ends with the
/// header of the assistant's turn, ready for generation. `bos_token`/`eos_token` are visible
/// to the template under those names when given.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let env = environment();
    let compiled = env.template_from_str(template).map_err(|e| FormatError::Template(describe(&e)))?;
    let mut ctx = context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        tools => (),
        documents => (),
    };
    if let Some(bos) = bos_token {
        ctx = context! { bos_token => bos, ..ctx };
    }
    if let Some(eos) = eos_token {
        ctx = context! { eos_token => eos, ..ctx };
    }
    compiled.render(ctx).map_err(|e| FormatError::Template(describe(&e)))
}

/// One line: the error, where it happened, and what caused it.
fn describe(error: &Error) -> String {
    if error.kind() == ErrorKind::OutOfFuel {
        return format!("the chat template did not finish within {TEMPLATE_FUEL} steps");
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! Errors: what the server's setup can fail with, and the OpenAI-shaped body every failed request gets.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Failures that stop the server itself (a failed request is an [`ApiError`]).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("the engine thread stopped unexpectedly")]
    EngineGone,
}

/// A request's failure, answered as `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400: the request is wrong; `param` names the field when one is to blame, else the first
    /// setting the message names (library errors name settings as `` `field` ``, written here
    /// as the request's field names).
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let message = message.into();
        let param = param.or_else(|| pare_model::setting_names(&message).first().copied()).map(str::to_string);
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: pare_model::spell_settings(&message, str::to_string),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: pare_model::spell_settings(&message.into(), str::to_string),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn unauthorized() -> Self {
        ApiError::status(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid or missing API key (Authorization: Bearer KEY)",
        )
        .with_code("invalid_api_key")
    }

    pub fn loading() -> Self {
        ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the model is still loading")
    }

    pub fn queue_full(queue: usize) -> Self {
        ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!("the server is busy: {queue} sequences already wait; retry later"),
        )
        .with_code("queue_full")
    }

    pub fn timeout(seconds: f64) -> Self {
        ApiError::status(
            StatusCode::REQUEST_TIMEOUT,
            "timeout_error",
            format!("the request took longer than the server's limit of {seconds} s"),
        )
        .with_code("timeout")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A library's setting name becomes the request field, in the message and as `param`.
    #[test]
    fn settings_a_library_names_become_request_fields() {
        let e = ApiError::invalid("`ratio` must be in [0, 1), got 1.5", None);
        assert_eq!(e.message, "ratio must be in [0, 1), got 1.5");
        assert_eq!(e.param.as_deref(), Some("ratio"));
        let e = ApiError::invalid("`capacity` (4) must be at least `sinks` (8)", Some("press"));
        assert_eq!(
            (e.message.as_str(), e.param.as_deref()),
            ("capacity (4) must be at least sinks (8)", Some("press"))
        );
    }
}

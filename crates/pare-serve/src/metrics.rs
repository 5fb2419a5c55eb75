//! Prometheus metrics: names, and the process-wide recorder `/metrics` renders.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "pare_requests_total";
pub const QUEUE_DEPTH: &str = "pare_queue_depth";
pub const RUNNING: &str = "pare_running_sequences";
pub const TTFT: &str = "pare_time_to_first_token_seconds";
pub const ITL: &str = "pare_inter_token_latency_seconds";
pub const REQUEST_SECONDS: &str = "pare_request_duration_seconds";
pub const TOKENS_IN: &str = "pare_prompt_tokens_total";
pub const TOKENS_OUT: &str = "pare_generation_tokens_total";
pub const KV_IN_USE: &str = "pare_kv_cache_bytes";
pub const KV_SAVED: &str = "pare_kv_cache_bytes_saved";
pub const KV_RESERVED: &str = "pare_kv_cache_bytes_reserved";
pub const KV_BUDGET: &str = "pare_kv_cache_budget_bytes";
pub const CANCELLED: &str = "pare_cancelled_sequences_total";
pub const PREEMPTIONS: &str = "pare_preemptions_total";
pub const PREFILL_TOKENS: &str = "pare_prefill_tokens_total";
pub const PREFILL_STEPS: &str = "pare_prefill_steps_total";
pub const PREFILL_CHUNKS: &str = "pare_prefill_chunks_total";
pub const PREFIX_HITS: &str = "pare_prefix_cache_hits_total";
pub const PREFIX_MISSES: &str = "pare_prefix_cache_misses_total";
pub const PREFIX_HIT_TOKENS: &str = "pare_prefix_cache_hit_tokens_total";
pub const PREFIX_CACHE_BYTES: &str = "pare_prefix_cache_bytes";
pub const CONTEXT_BYTES: &str = "pare_context_bytes";
pub const STEP_SECONDS: &str = "pare_engine_step_seconds";
pub const FORWARD_SECONDS: &str = "pare_model_forward_seconds";

/// The recorder is global to the process (the `metrics` macros write to it), so a second server
/// in one process shares it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
            .expect("non-empty buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program: ours then only renders.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    metrics::describe_counter!(REQUESTS, "HTTP requests by endpoint and status code");
    metrics::describe_gauge!(QUEUE_DEPTH, "sequences waiting for admission");
    metrics::describe_gauge!(RUNNING, "sequences being generated");
    metrics::describe_histogram!(TTFT, "time from arrival to a sequence's first token");
    metrics::describe_histogram!(ITL, "time between a sequence's consecutive tokens");
    metrics::describe_histogram!(REQUEST_SECONDS, "time from arrival to the last byte of the answer");
    metrics::describe_counter!(TOKENS_IN, "prompt tokens of admitted requests");
    metrics::describe_counter!(TOKENS_OUT, "generated tokens");
    metrics::describe_gauge!(KV_IN_USE, "KV-cache bytes held by running sequences (after compression)");
    metrics::describe_gauge!(KV_SAVED, "KV-cache bytes that compression and pruning removed from running sequences");
    metrics::describe_gauge!(KV_RESERVED, "KV bytes in use plus the growth reserved for running sequences");
    metrics::describe_gauge!(KV_BUDGET, "the admission budget for KV-cache bytes");
    metrics::describe_counter!(CANCELLED, "sequences dropped because their client left or timed out");
    metrics::describe_counter!(PREEMPTIONS, "running sequences whose cache was dropped to be run again later");
    metrics::describe_counter!(
        PREFILL_TOKENS,
        "tokens run through prefill (prompts less shared prefixes and contexts, recomputes, contexts)"
    );
    metrics::describe_counter!(PREFILL_STEPS, "engine steps whose forward ran prompt chunks");
    metrics::describe_counter!(
        PREFILL_CHUNKS,
        "prompt chunks run in those steps (more chunks than steps: prompts prefilled together)"
    );
    metrics::describe_counter!(PREFIX_HITS, "plain prompts that continued from a shared prefix");
    metrics::describe_counter!(PREFIX_MISSES, "plain prompts that found no shared prefix");
    metrics::describe_counter!(PREFIX_HIT_TOKENS, "prompt tokens taken from shared prefixes instead of prefilled");
    metrics::describe_gauge!(PREFIX_CACHE_BYTES, "KV bytes of shared prompt prefixes held");
    metrics::describe_gauge!(CONTEXT_BYTES, "KV bytes of the contexts held (POST /v1/contexts)");
    metrics::describe_histogram!(STEP_SECONDS, "one engine step: the batch's forward and the choice of every token");
    metrics::describe_histogram!(FORWARD_SECONDS, "the model's forward of one engine step, until its logits are ready");
}

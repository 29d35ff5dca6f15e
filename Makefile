# One entry point for developers.
.PHONY: build test lint bench fmt
build:
	python3 -m pip install -q .
test:
	python3 -m pip install -q '.[test]' && cargo test -q && python3 -m pytest -q tests
lint:
	bash .ci/lint
fmt:
	cargo fmt
bench: build
	python3 -m dynblock.bench

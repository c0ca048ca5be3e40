# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.bm6b-installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1

.PHONY: demo test install clean

install: $(STAMP)

# pip (not uv or poetry): it finds the machine's local torch wheels; see pyproject.toml for the pins.
# A changed .pyx file is compiled again by the install.
$(STAMP): pyproject.toml setup.py $(wildcard bm6b/filters/*.pyx)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bm6b demo --output bm6b-demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) bm6b-demo bm6b-demo-manifest.tsv

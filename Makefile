# rtauto: `make demo` runs the main job on the embedded default; `make test` passes the tests.
# Every target installs what it needs first (idempotent): Debian packages and a .venv.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb plastimatch postgresql
PLUGINS := plugins/autocontour plugins/plan_check plugins/image_guidance
PYTEST_ARGS ?=

.PHONY: install install-system install-python demo test bench lint schemas clean

install: install-system install-python

# Debian packages the tests and the demo use: dcmtk (storescu/storescp/echoscu),
# dicom3tools (dciodvfy), Orthanc (a real PACS) with its DICOMweb plugin, plastimatch (an
# independent RTSTRUCT reader).
install-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi

install-python: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the CPU build (monai would otherwise pull a CUDA build)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[web,dev,postgres,bench]' $(addprefix -e ,$(PLUGINS))
	touch $@

demo: install
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/ingest.py
	$(PY) bench/autocontour.py
	$(PY) bench/dvh.py
	$(PY) bench/plan_check.py
	$(PY) bench/registration.py

lint: install
	$(VENV)/bin/ruff check src tests plugins bench scripts
	$(VENV)/bin/ruff format --check src tests plugins bench scripts

clean:
	rm -rf $(VENV) rtauto-home demo-out .bench .pytest_cache

# The two commands of the README: `make demo` and `make test`. Each creates the virtualenv when
# missing, installs the package with the exact versions of constraints.txt, and runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATA ?= data/synth
RUN ?= runs/demo

.PHONY: install demo explain explain-gradcam test test-slow lab export constraints readme readme-images

install: $(INSTALLED)

# Byte-compiling once matters where PYTHONDONTWRITEBYTECODE is set (imports take twice as long without it);
# torch ships one Python-3.12-only test file that older interpreters cannot compile.
$(INSTALLED): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib/python3*/site-packages > /dev/null
	touch $@

# The main job: SynthCelebA (cached in $(DATA)) unless DATA points at real CelebA, then train, evaluate,
# explain and report into $(RUN).
demo: install
	$(BIN)/mtabn_demo --data $(DATA) --out $(RUN)

# Attention maps worth measuring: the `explain` recipe on 9,000 SynthCelebA images (cached in $(EXPLAIN_DATA)),
# explanation metrics on 256 test images; 44 minutes on 2 CPU cores.
EXPLAIN_DATA ?= data/synth9k
EXPLAIN_RUN ?= runs/explain
explain: install
	$(BIN)/mtabn_demo --recipe explain --data $(EXPLAIN_DATA) --n 9000 --out $(EXPLAIN_RUN) --metrics-images 256

# After make explain: a plain ResNet-10 trained by the same recipe into $(EXPLAIN_RUN)_baseline, and its Grad-CAM
# measured beside the attention maps on the same 256 test images (RUN/explain/test/); 12 minutes on 2 CPU cores.
explain-gradcam: install
	$(BIN)/mtabn_train --recipe explain --model resnet10 --data $(EXPLAIN_DATA) --out $(EXPLAIN_RUN)_baseline --overwrite --quiet
	$(BIN)/mtabn_explain $(EXPLAIN_RUN) --baseline $(EXPLAIN_RUN)_baseline --metrics-images 256

# Every notebook runs twice: in-process by nbdev_test, and in a real Jupyter kernel as JupyterLab's "Run All" runs
# it (tests/test_notebooks.py, `#| eval: false` cells included); `#| slow` cells only under test-slow.
test: install
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest -q -n 2 -m "not slow" tests

test-slow: install
	$(BIN)/nbdev_test --n_workers 2 --flags slow
	$(BIN)/pytest -q -n 2 tests

lab: install
	$(BIN)/jupyter lab --notebook-dir nbs

# Notebooks are the source: regenerate the package and strip notebook noise before committing.
export: install
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

# Record the exact versions of the current environment (after changing requirements in settings.ini).
constraints:
	{ echo "# Exact versions tested (make installs with -c constraints.txt). Regenerate: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | sort -f; } > constraints.txt

# README.md is generated from nbs/index.ipynb.
readme:
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN
	$(BIN)/python -c "import pathlib; p = pathlib.Path('README.md'); p.write_text(p.read_text().replace('](images/', '](nbs/images/'))"

# The README's pictures (nbs/images/*.png, small and tracked) redrawn from a finished run: make readme-images RUN=runs/x
readme-images: install
	$(BIN)/python -c "import sys; from multitask_abn.cli import user_errors; from multitask_abn.analysis import write_readme_images; \
	print(*user_errors('make readme-images')(write_readme_images)(sys.argv[1], 'nbs/images'), sep='\n')" $(RUN)

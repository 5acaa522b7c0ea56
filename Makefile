# The two commands of the README: `make demo` and `make test`. Each creates the virtualenv when
# missing, installs the package with the exact versions of constraints.txt, and runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
DATA ?= data/synth
RUN ?= runs/demo

.PHONY: install demo explain edit-demo bench test test-slow gpu-check lab export constraints readme readme-images record docs browser

install: $(INSTALLED)

# Byte-compiling once matters where PYTHONDONTWRITEBYTECODE is set (imports take twice as long without it);
# torch ships one Python-3.12-only test file that older interpreters cannot compile.
# Quantus (a test-only cross-check of the explanation metrics) is installed without its declared dependencies: it asks for
# opencv-python, whose cv2/ would overwrite opencv-python-headless's; its other needs are dev requirements.
# facenet-pytorch (the face detector of `mtabn_predict --align`, MTCNN with its weights in the wheel) likewise: its metadata
# pins torch<2.3, numpy<2 and Pillow<10.3, yet its MTCNN runs on the versions pinned here (tests/test_align.py).
$(INSTALLED): settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt quantus
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt facenet-pytorch
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $(VENV)/lib/python3*/site-packages > /dev/null
	touch $@

# The main job: SynthCelebA (cached in $(DATA)) unless DATA points at real CelebA, then train, evaluate,
# explain and report into $(RUN).
demo: install
	$(BIN)/mtabn_demo --data $(DATA) --out $(RUN)

# Explanations measured where a template cannot win: the `explain` recipe and a plain ResNet-10 by the same recipe on
# 4,000 `wild` SynthCelebA faces (cached in $(EXPLAIN_DATA)), then accuracy and explanation metrics (ABN attention, Grad-CAM,
# Grad-CAM++, beside the prior/centre/uniform baselines, with counterfactuals) on 256 valid images (where choices are made)
# and once on 256 test images, and a report. See README for its time on two CPU cores.
EXPLAIN_DATA ?= data/wild4k
EXPLAIN_IMAGES ?= 4000
EXPLAIN_RUN ?= runs/explain
explain: install
	$(BIN)/mtabn_synth $(EXPLAIN_DATA) --n $(EXPLAIN_IMAGES) --layout wild
	$(BIN)/mtabn_train --recipe explain --data $(EXPLAIN_DATA) --out $(EXPLAIN_RUN) --overwrite --quiet
	$(BIN)/mtabn_train --recipe explain --model resnet10 --data $(EXPLAIN_DATA) --out $(EXPLAIN_RUN)_baseline --overwrite --quiet
	for split in valid test; do \
	  $(BIN)/mtabn_eval $(EXPLAIN_RUN) --split $$split --quiet && \
	  $(BIN)/mtabn_explain $(EXPLAIN_RUN) --baseline $(EXPLAIN_RUN)_baseline --split $$split --metrics-images 256 || exit 1; \
	done
	$(BIN)/mtabn_report $(EXPLAIN_RUN) $(EXPLAIN_RUN)_baseline --out $(EXPLAIN_RUN)/report

# Attention editing (nbs/09_edit): SynthCelebA with a badge planted for Smiling in the train split, an ABN trained on it and
# one on unbiased faces, fine-tuning on 10, 50 and 200 ground-truth edited maps with and without the attention loss, every
# model measured on valid/test, unbiased and shifted, into $(EDIT_WORK)/edit_results.csv. See README for its time.
EDIT_WORK ?= runs/edit
edit-demo: install
	$(BIN)/python -m multitask_abn.edit --work $(EDIT_WORK)

# Every notebook runs twice: in-process by nbdev_test, and in a real Jupyter kernel as JupyterLab's "Run All" runs
# it (tests/test_notebooks.py, `#| eval: false` cells included); `#| slow` cells only under test-slow.
# Two test processes at a time, one thread each: with torch's default of a thread per core each, two processes on two
# cores slowed each other ~9x in the heaviest test (pytest 20 min 12 s -> 8 min 21 s, nbdev_test 2 min 50 s -> 1 min 53 s
# on the AMD EPYC).
TEST_THREADS := OMP_NUM_THREADS=1
test: install browser
	$(TEST_THREADS) $(BIN)/nbdev_test --n_workers 2
	$(TEST_THREADS) $(BIN)/pytest -q -n 2 -m "not slow" --durations=15 tests

test-slow: install
	$(TEST_THREADS) $(BIN)/nbdev_test --n_workers 2 --flags slow
	$(TEST_THREADS) $(BIN)/pytest -q -n 2 tests

# The CPU benchmarks, kept in $(BENCH) for 08_bench's record: layer4's convolutions in bf16 (oneDNN vs matrix products),
# then every execution mode of ABN-v1 ResNet-101 (batch 8, 224 px) against the float32 loop, with the decisions check on
# the demo run (built first when $(RUN) has none). 10-12 minutes on two cores.
BENCH ?= runs/bench
bench: install $(RUN)/eval/test/summary.json
	$(BIN)/python -m multitask_abn.bench convolutions --out $(BENCH)
	$(BIN)/python -m multitask_abn.bench models --model abn_v1_resnet101 --batch 8 --size 224 --checkpoint $(RUN) \
	  --data $(DATA) --out $(BENCH)

# The CUDA path on a GPU machine (<= 5 minutes on one modern GPU): the `gpu` tests (training, resume, evaluation, explain,
# predict on CUDA against the CPU), then a short demo-recipe run and the benchmark of ABN-v1 ResNet-101 on the GPU, whose
# last line is one JSON object: images/s, peak memory, speed-ups and the decisions check. Without a GPU it says so and stops.
GPU_CHECK ?= runs/gpu_check
gpu-check: install
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" || \
	  { echo "gpu-check: no CUDA GPU on this machine: nothing to check"; exit 0; }; \
	set -e; \
	$(BIN)/pytest -q -m gpu tests/test_gpu.py; \
	$(BIN)/mtabn_synth $(GPU_CHECK)/synth --n 1000 > /dev/null; \
	$(BIN)/mtabn_train --recipe demo --data $(GPU_CHECK)/synth --out $(GPU_CHECK)/run --device cuda --workers 4 --epochs 2 --overwrite --quiet; \
	$(BIN)/python -m multitask_abn.bench models --model abn_v1_resnet101 --checkpoint $(GPU_CHECK)/run --data $(GPU_CHECK)/synth \
	  --device cuda --batch 32 --iters 5 --threads 8 | tail -1

# The notebooks saved with their outputs, the lab record a reader sees without running anything: every notebook of nbs/ in
# order, each in a fresh Jupyter kernel with fixed seeds, outputs tidied (compressed figures, no progress bars, short logs),
# then nbdev_clean. Builds the demo run first when $(RUN) has none (make demo). `#| slow` cells run with RECORD_FLAGS=slow.
RECORD_FLAGS ?=
record: install $(RUN)/eval/test/summary.json
	$(BIN)/python -m multitask_abn.workbook record $(if $(RECORD_FLAGS),--flags $(RECORD_FLAGS))
	$(MAKE) readme

$(RUN)/eval/test/summary.json:
	$(MAKE) demo

# A static site of the (recorded) notebooks and the API reference in _site/ (mkdocs-material + mkdocs-jupyter, offline).
docs: install
	$(BIN)/python -m multitask_abn.workbook docs --site _site

# Headless Chromium for the browser tests (tests/test_browser.py): Debian's package, as root; Playwright drives it.
browser:
	@command -v chromium > /dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium > /dev/null; } \
	  || echo "chromium could not be installed: the browser tests will be skipped"


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
# (outputs left out: the README shows the index's code; its recorded figures are on the docs site)
readme:
	$(BIN)/jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README --log-level WARN --TemplateExporter.exclude_output=True
	$(BIN)/python -c "import pathlib; p = pathlib.Path('README.md'); p.write_text(p.read_text().replace('](images/', '](nbs/images/'))"
	rm -rf README_files   # nbconvert extracts the figures before it leaves the outputs out

# The README's pictures (nbs/images/*.png, small and tracked) redrawn from a finished run: make readme-images RUN=runs/x
readme-images: install
	$(BIN)/python -c "import sys; from multitask_abn.cli import user_errors; from multitask_abn.analysis import write_readme_images; \
	print(*user_errors('make readme-images')(write_readme_images)(sys.argv[1], 'nbs/images'), sep='\n')" $(RUN)

# Quick start targets. Each one installs what it needs first, so both work on a fresh machine.
PYTHON ?= python3
# torch 2.14.1 + torchvision 0.29.1: the pair whose wheels match here (torchvision is needed by the
# Idefics3 and Qwen-VL image processors). On your own GPU machine, install the torch you use instead.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo demo-vqa test lint

install:
	$(PYTHON) -m pip install -q $(TORCH)
	$(PYTHON) -m pip install -q -e '.[test]'

demo: install
	$(PYTHON) -m vlm_tune.train recipes/demo.yaml train.overwrite=true  # a second make demo starts over in runs/demo
	$(PYTHON) -m vlm_tune.evaluate recipes/demo.yaml --output-dir runs/demo/eval-base --overwrite
	$(PYTHON) -m vlm_tune.evaluate --checkpoint runs/demo --output-dir runs/demo/eval-trained --overwrite
	$(PYTHON) -m vlm_tune.evaluate --compare runs/demo/eval-base runs/demo/eval-trained --out runs/demo/compare.md
	$(PYTHON) -m vlm_tune.export runs/demo --out runs/demo/export-merged --merge --overwrite
	$(PYTHON) scripts/plain_transformers_caption.py runs/demo/export-merged data/shapes/images/test_00000.png data/shapes/images/test_00001.png

demo-vqa: install
	$(PYTHON) -m vlm_tune.train recipes/demo_vqa.yaml
	$(PYTHON) -m vlm_tune.evaluate recipes/demo_vqa.yaml --output-dir runs/demo_vqa/eval-base --overwrite
	$(PYTHON) -m vlm_tune.evaluate --checkpoint runs/demo_vqa --output-dir runs/demo_vqa/eval-trained --overwrite
	$(PYTHON) -m vlm_tune.evaluate --compare runs/demo_vqa/eval-base runs/demo_vqa/eval-trained --out runs/demo_vqa/compare.md

lint:
	$(PYTHON) -m ruff check vlm_tune tests benchmarks scripts
	$(PYTHON) -m ruff format --check vlm_tune tests benchmarks scripts

test: install lint
	$(PYTHON) -m pytest -q --timeout 900
